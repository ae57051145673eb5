from detectron2.config import CfgNode as CN


def add_region_contrast_config(cfg):
    """
    Add the config keys of RegionContrast (``MODEL.REGION_CONTRAST``) and of the solver and
    test-time options this project adds. Call after ``add_deeplab_config(cfg)``.
    """
    cfg.MODEL.REGION_CONTRAST = CN()
    # False builds the plain Detectron2 baseline: same parameters, no projection head, no bank.
    cfg.MODEL.REGION_CONTRAST.ENABLED = False
    # With MODEL.SEM_SEG_HEAD.NAME "RegionContrastHead": the registered semantic head to train
    # with region contrast (Detectron2's, the DeepLab project's or your own), built unchanged.
    cfg.MODEL.REGION_CONTRAST.HEAD_NAME = "SemSegFPNHead"
    # Path, inside the head, of the classifier whose input (N, C, H, W) is contrasted.
    cfg.MODEL.REGION_CONTRAST.FEATURE_MODULE = "predictor"
    # Class ids kept out of the contrast (e.g. Panoptic FPN's merged "things" class, 0).
    cfg.MODEL.REGION_CONTRAST.EXCLUDED_CLASSES = []
    # Output width of the projection head; 0 contrasts the decoder's features directly.
    cfg.MODEL.REGION_CONTRAST.PROJ_DIM = 256
    # Softmax temperature t of the contrastive loss; must be > 0.
    cfg.MODEL.REGION_CONTRAST.TEMPERATURE = 0.1
    # Weight of the contrastive loss next to the head's cross entropy.
    cfg.MODEL.REGION_CONTRAST.LOSS_WEIGHT = 0.1
    # Slots per class in the memory bank (a FIFO ring per class).
    cfg.MODEL.REGION_CONTRAST.MEMORY_SIZE = 1000
    # Storage dtype of the bank: "float32", "float16" or "bfloat16" (the loss runs in float32).
    cfg.MODEL.REGION_CONTRAST.MEMORY_DTYPE = "float32"
    # Which labels define the regions: "gt" (ground truth) or "pred" (argmax, non-ignored pixels).
    cfg.MODEL.REGION_CONTRAST.REGION_SOURCE = "gt"
    # Filled slots drawn at random per class for each step's loss; 0 uses the whole bank.
    cfg.MODEL.REGION_CONTRAST.SAMPLES_PER_CLASS = 0
    # Anchors contrasted with the bank: "region" (region centres, the paper) or "pixel".
    cfg.MODEL.REGION_CONTRAST.ANCHORS = "region"
    # With ANCHORS "pixel": pixels sampled per region, half of them mis-classified when possible.
    cfg.MODEL.REGION_CONTRAST.PIXELS_PER_REGION = 16
    # Extra bank entries per region, each the mean of a random pixel subset; 0 turns it off.
    cfg.MODEL.REGION_CONTRAST.DYNAMIC_SAMPLES = 0
    # Fraction of a region's pixels averaged into each dynamic sample, in (0, 1].
    cfg.MODEL.REGION_CONTRAST.DYNAMIC_FRACTION = 0.5
    # Iterations of cross entropy alone before the contrastive loss is added (the bank fills).
    cfg.MODEL.REGION_CONTRAST.WARMUP_ITERS = 0

    # Std of the segmentation classifier's initial weights (the DeepLab heads' 0.001 suits
    # pretrained backbones; from scratch it stalls the decoder, see heads.py).
    cfg.MODEL.SEM_SEG_HEAD.PREDICTOR_INIT_STD = 0.001

    # Optimizer: "SGD" (Detectron2's default) or "ADAMW" (for recipes trained from scratch).
    cfg.SOLVER.OPTIMIZER = "SGD"

    # Sliding-window evaluation (RegionContrastSegmentor): for images larger than the training
    # crop, and for DeepLab heads whose ASPP pools over a window fixed by INPUT.CROP.SIZE.
    cfg.TEST.SLIDING_WINDOW = CN()
    # False evaluates the whole image at once (Detectron2's default, the parent's forward).
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    # Window (height, width) in input pixels; empty uses INPUT.CROP.SIZE (the training crop).
    cfg.TEST.SLIDING_WINDOW.CROP_SIZE = []
    # Step (height, width) between windows, at most the window; empty uses 2/3 of the window.
    cfg.TEST.SLIDING_WINDOW.STRIDE = []
    # Windows per forward pass; bounds the memory of evaluating a large image.
    cfg.TEST.SLIDING_WINDOW.BATCH_SIZE = 4
