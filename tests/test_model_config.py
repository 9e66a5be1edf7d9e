"""The dots1 config: parameter counts against the released model's facts and the built model."""
import pytest

from anneal.errors import AnnealError
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.model.config import Dots1Config


def test_default_config_is_dots_llm1_142b_total_14b_active():
    cfg = Dots1Config()
    assert cfg.num_parameters() == pytest.approx(142e9, rel=0.01)
    assert cfg.num_parameters(active=True) == pytest.approx(14e9, rel=0.01)
    # 6 x active non-embedding params + causal attention at seq 4096: ~9.3e10 FLOPs per token
    assert cfg.train_flops_per_token(4096) == pytest.approx(6 * (14.02e9 - 152064 * 4096) + 12 * 62 * 4096 * 4096,
                                                            rel=0.01)


def test_parameter_count_matches_the_built_model():
    cfg = Dots1Config(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)
    model = Dots1ForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
    ({"n_group": 8}, "n_group"),
])
def test_bad_config_json_names_the_field(change, field):
    d = Dots1Config().to_hf_dict()
    d.update(change)
    with pytest.raises(AnnealError, match=field):
        Dots1Config.from_hf_dict(d, source="x/config.json")
