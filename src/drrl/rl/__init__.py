"""The learned rank controller of DR-RL: its policy (a small Transformer over the decisions of a forward pass),
the reward, PPO, and one :class:`PolicyTrainer` that every training loop uses. Imports the controller interface
from :mod:`drrl.controllers`; nothing in :mod:`drrl.attention` imports this room."""

from drrl.controllers import (
    EnergyController,
    FixedController,
    RandomController,
    RankController,
    SegmentStats,
    available_controllers,
    build_controller,
)
from drrl.rl.config import RLConfig
from drrl.rl.controller import RLController
from drrl.rl.policy import EpsilonSchedule, RankPolicy
from drrl.rl.ppo import PPO, Episode, PPOConfig
from drrl.rl.reward import RewardConfig
from drrl.rl.trainer import PolicyTrainer

__all__ = [
    "PPO",
    "EnergyController",
    "Episode",
    "EpsilonSchedule",
    "FixedController",
    "PPOConfig",
    "PolicyTrainer",
    "RLConfig",
    "RLController",
    "RandomController",
    "RankController",
    "RankPolicy",
    "RewardConfig",
    "SegmentStats",
    "available_controllers",
    "build_controller",
]
