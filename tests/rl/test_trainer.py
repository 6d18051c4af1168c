"""PolicyTrainer: the one PPO loop of the rank policy (training, the demo and classification use it)."""

import torch

from drrl.models import GPT, GPTConfig
from drrl.rl import PolicyTrainer, RLConfig


def rl_gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, context=32, vocab_size=64, attention="drrl",
                    attention_kwargs={"controller": "rl", "segment": 8, "bucket": 4})  # fmt: skip
    return GPT(cfg)


def test_trainer_configures_the_controller_and_learns_from_rollouts():
    model = rl_gpt()
    ctrl = model.rank_controller
    cfg = RLConfig(lr=1e-2, alpha=1.0, beta=0.7, gamma=0.2, eps_start=0.4, eps_end=0.0, eps_decay_steps=4)
    trainer = PolicyTrainer(ctrl, cfg, seed=5)
    assert (ctrl.reward_cfg.alpha, ctrl.reward_cfg.beta, ctrl.reward_cfg.gamma) == (1.0, 0.7, 0.2)
    assert ctrl.epsilon(0) == 0.4 and ctrl.epsilon(4) == 0.0
    assert torch.equal(ctrl.generator.get_state(), torch.Generator().manual_seed(5).get_state())
    before = [p.detach().clone() for p in ctrl.policy.parameters()]
    x = torch.randint(0, 64, (2, 32))
    for _ in range(2):
        trainer.begin()
        model(x)
        assert trainer.collect() == 2  # one episode per sequence
        stats = trainer.update()
        assert trainer.episodes == [] and stats["epsilon"] == ctrl.epsilon(ctrl.updates - 1)
        assert {"policy_loss", "value_loss", "mean_reward", "approx_kl"} <= set(stats)
    assert ctrl.updates == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, ctrl.policy.parameters(), strict=True))


def test_trainer_state_round_trips_and_an_empty_rollout_still_counts():
    model = rl_gpt()
    trainer = PolicyTrainer(model.rank_controller, RLConfig(), seed=1)
    assert trainer.update() == {}  # no episode: no PPO step, the ε schedule still advances
    state = trainer.state_dict()
    other = PolicyTrainer(rl_gpt().rank_controller, RLConfig(), seed=9)
    other.load_state_dict(state)
    assert other.controller.updates == 1
    assert torch.equal(other.controller.generator.get_state(), model.rank_controller.generator.get_state())
