"""Code shards: resumable writes that lose and duplicate nothing, strict reads."""

from __future__ import annotations

import numpy as np
import pytest

from argen.data.codes import CodeShardDataset, CodeShardMeta, CodeShardWriter, read_meta


def _meta(**kw):
    base = dict(num_items=10, done=0, grid=(2, 3), num_codes=512, tokenizer_hash="abc", dataset="shapes", split="train", resolution=32)
    return CodeShardMeta(**{**base, **kw})


def _rows(start, n):
    codes = (np.arange(start, start + n)[:, None] * 7 + np.arange(6)[None]) % 512
    return codes, [f"caption {i}" for i in range(start, start + n)], [f"k{i}" for i in range(start, start + n)]


def test_interrupted_write_resumes_to_the_same_shard(tmp_path):
    whole = CodeShardWriter(tmp_path / "whole", _meta(), resume=False)
    for start in (0, 4, 8):
        whole.append(*_rows(start, min(4, 10 - start)))

    part = CodeShardWriter(tmp_path / "part", _meta(), resume=False)
    part.append(*_rows(0, 4))
    # a crash after captions were appended but before meta.json moved on: the chunk must be redone once
    with open(tmp_path / "part" / "captions.jsonl", "a") as fh:
        fh.write('{"text": "half-written", "key": "x"}\n')
    part = CodeShardWriter(tmp_path / "part", _meta(), resume=True)
    assert part.meta.done == 4
    part.append(*_rows(4, 4))
    part.append(*_rows(8, 2))

    a, b = CodeShardDataset(tmp_path / "whole"), CodeShardDataset(tmp_path / "part")
    assert len(a) == len(b) == 10
    assert np.array_equal(np.asarray(a.codes), np.asarray(b.codes)) and a.captions == b.captions
    assert b[3]["caption"] == "caption 3" and b[3]["codes"].tolist() == _rows(3, 1)[0][0].tolist()


def test_incomplete_wrong_tokenizer_and_mismatched_resume_are_errors(tmp_path):
    w = CodeShardWriter(tmp_path / "s", _meta(), resume=False)
    w.append(*_rows(0, 4))
    with pytest.raises(ValueError, match="incomplete \\(4/10 rows\\)"):
        CodeShardDataset(tmp_path / "s")
    with pytest.raises(ValueError, match="num_codes: 512 != 1024"):
        CodeShardWriter(tmp_path / "s", _meta(num_codes=1024), resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        CodeShardWriter(tmp_path / "s", _meta(), resume=False)
    w.append(*_rows(4, 6))
    assert read_meta(tmp_path / "s").complete
    with pytest.raises(ValueError, match="made by tokenizer abc"):
        CodeShardDataset(tmp_path / "s", expect_tokenizer_hash="def")
    with pytest.raises(ValueError, match="is full"):
        w.append(*_rows(0, 1))
