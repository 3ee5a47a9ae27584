"""Models and feature extraction over readings from sensors/."""
