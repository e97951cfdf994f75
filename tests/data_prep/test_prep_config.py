"""Config validation: a bad value fails before any work, in one line naming the field."""
from __future__ import annotations

import subprocess
import sys

import pytest

from data_prep.__main__ import main
from data_prep.config import ConfigError, load_config


def test_defaults_match_the_brief():
    cfg = load_config([])
    assert cfg.out_dir == "runs/demo/data" and cfg.samples_per_shard == 5000 and cfg.tokenizer.vocab_size == 2000
    assert list(cfg.sources) == ["fashion_mnist", "tuxpaint"] and list(cfg.filters) == ["caption_length", "image_size"]
    assert cfg.sources["tuxpaint"].heldout_fraction == 0.15 and cfg.sources["fashion_mnist"].heldout_fraction == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["tokenizer.model_type=wordpiece"], "tokenizer.model_type: Invalid value 'wordpiece', expected one of [unigram, bpe]"),
    (["samples_per_shard=0"], "samples_per_shard must be >= 1, got 0"),
    (["samples_per_shard=many"], "samples_per_shard: Value 'many' of type 'str' could not be converted to Integer"),
    (["filters.caption_length.min_words=5", "filters.caption_length.max_words=3"],
     "filters.caption_length: min_words (5) must be <= max_words (3)"),
    (["sources.tuxpaint.heldout_fraction=1.5"], "sources.tuxpaint: heldout_fraction must be in [0, 1], got 1.5"),
    (["+filters.clip_scor={}"], "filters.clip_scor: unknown filter; allowed: "),
    (["+sources.laion={}"], "sources.laion: unknown source; allowed: "),
    (["+sources.laion={type: tabel}"], "sources.laion: unknown type 'tabel'; allowed: "),
    (["sources.tuxpaint.max_sid=3"], "sources.tuxpaint.max_sid: Key 'max_sid' is not in struct"),
])
def test_bad_values_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert str(e.value) == message if not message.endswith("allowed: ") else str(e.value).startswith(message)


def test_cli_reports_bad_value_and_does_nothing(tmp_path, capsys):
    assert main(["build", f"out_dir={tmp_path / 'out'}", "tokenizer.model_type=wordpiece"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: tokenizer.model_type") and "unigram, bpe" in err
    assert not (tmp_path / "out").exists()
    assert main(["build", "--cfg", "seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep", "build", f"out_dir={tmp_path}", "samples_per_shard=-1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr == "error: samples_per_shard must be >= 1, got -1\n"
    assert list(tmp_path.iterdir()) == []
