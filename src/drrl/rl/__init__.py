"""Rank controllers and the RL agent (policy, reward, PPO). Depends only on torch and :mod:`drrl.flops`; attention
modules import the controllers from here, so nothing in this package imports attention or models."""

from drrl.rl.controllers import (
    EnergyController,
    FixedController,
    RandomController,
    RankController,
    RLController,
    SegmentStats,
    available_controllers,
    build_controller,
)
from drrl.rl.policy import EpsilonSchedule, RankPolicy
from drrl.rl.ppo import PPO, Episode, PPOConfig
from drrl.rl.reward import RewardConfig

__all__ = [
    "PPO",
    "EnergyController",
    "Episode",
    "EpsilonSchedule",
    "PPOConfig",
    "RLController",
    "RankPolicy",
    "RewardConfig",
    "FixedController",
    "RandomController",
    "RankController",
    "SegmentStats",
    "available_controllers",
    "build_controller",
]
