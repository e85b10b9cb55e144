from env.darkroom import Darkroom, all_goals

__all__ = ["Darkroom", "all_goals"]
