"""Pictures of what the contrast learns: the memory bank's class similarities and projection."""
