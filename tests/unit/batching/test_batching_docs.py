"""runtime/README.md documents every model-config field and every batcher metric."""

from pathlib import Path

from deepfleet.batching.metrics import BatcherMetrics
from deepfleet.batching.repository import AdaptiveSettings, ModelConfig, TensorSpec

README = (Path(__file__).parents[3] / "runtime" / "README.md").read_text()
SECTION = README[README.index("## `deepfleet serve-models`"):]


def test_every_config_field_is_in_the_example():
    for name in ModelConfig.model_fields:
        assert f"\n{name}:" in SECTION or f"\n  {name}:" in SECTION, name
    for name in AdaptiveSettings.model_fields:
        assert f"{name}:" in SECTION, name
    for name in TensorSpec.model_fields:
        assert f"{name}:" in SECTION, name


def test_every_metric_is_documented():
    for family in BatcherMetrics().registry.collect():
        assert f"`{family.name}" in SECTION, family.name
