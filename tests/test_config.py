"""The segmenter's config.json."""

import json

from model.config import SegmenterConfig


def test_a_config_json_with_keys_of_other_versions_loads(tmp_path):
    """Files written when the [SEG] token was a setting (``seg_token``), or with a merge's
    ``merged_from``, load: the token is always constants.SEG_TOKEN."""
    config = SegmenterConfig("qwen2_5_vl", "tiny", 64, 32, vlm_path="owner/name", adapter_path="adapter")
    config.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    assert "seg_token" not in payload
    payload.update(seg_token="[SEG]", merged_from={"checkpoint": "elsewhere"})
    (tmp_path / "config.json").write_text(json.dumps(payload))
    assert SegmenterConfig.from_pretrained(tmp_path) == config
