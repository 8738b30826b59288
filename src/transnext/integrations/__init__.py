"""Optional integrations with the PyTorch ecosystem (timm, torchvision, smp)."""
