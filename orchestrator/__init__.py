"""The control plane: runs, episodes and trajectories, and the scheduler that moves them."""
