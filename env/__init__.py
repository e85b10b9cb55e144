"""Environments: Darkroom, DarkroomPermuted, Dark Key-to-Door; task splits; `make_env`.

Importing the package registers the gymnasium ids `Darkroom-v0`, `DarkroomPermuted-v0` and
`DarkKeyToDoor-v0`, so `gymnasium.make("Darkroom-v0", goal=(r, c))` works.
"""

import gymnasium as gym

from env.darkroom import MOVES, N_ACTIONS, Darkroom, DarkroomPermuted, KeyToDoor, ObserveKey
from env.tasks import VEC_ENVS, EnvSpec, env_section, get_spec, make_env, make_vec_env

for _id, _entry in [
    ("Darkroom-v0", "env.darkroom:Darkroom"),
    ("DarkroomPermuted-v0", "env.darkroom:DarkroomPermuted"),
    ("DarkKeyToDoor-v0", "env.darkroom:KeyToDoor"),
]:
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, disable_env_checker=True)

__all__ = ["MOVES", "N_ACTIONS", "Darkroom", "DarkroomPermuted", "KeyToDoor", "ObserveKey", "EnvSpec", "VEC_ENVS", "env_section", "get_spec", "make_env", "make_vec_env"]
