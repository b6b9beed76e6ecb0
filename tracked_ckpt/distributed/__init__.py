"""torchrun: the ranks collaborator of a CheckpointManager and sharded (DCP) saves.

Nothing here is imported until a process group is up: torch.distributed.checkpoint costs ~2 s to import.
"""
