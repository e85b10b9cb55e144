from model.ad import ADModel

__all__ = ["ADModel"]
