"""Bad input shared by every source: CSV decoding/quoting/ragged rows, oversized images,
messages that must not quote patient text, manifest time series, keys and reprs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import Box, Record, RecordError, safe_key
from kdscale.data.sources.base import open_csv, read_image

from test_cbis_source import row as cbis_row
from test_cbis_source import write_tree as cbis_tree
from test_manifest_source import SECRET, base_row, config, make_tree
from test_manifest_source import read as manifest_read


# -- open_csv ---------------------------------------------------------------------------------

def test_latin1_file_is_a_data_error_naming_file_and_row(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes("id,text\n1,ok\n2,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        list(open_csv(path, ["id"]))
    msg = str(err.value)
    assert "notes.csv" in msg and "not UTF-8" in msg and "line 3" in msg and "lait" not in msg


def test_unterminated_quote_is_an_error_not_swallowed_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,text\n1,"never closed\n2,b\n3,c\n')
    with pytest.raises(DataError, match="malformed CSV") as err:
        list(open_csv(path, ["id"]))
    assert "m.csv" in str(err.value) and "never closed" not in str(err.value)


def test_huge_field_is_read(tmp_path):
    path = tmp_path / "long.csv"
    note = "x" * 300_000                         # > the csv module's default 128 KiB limit
    path.write_text(f"id,text\n1,{note}\n")
    rows = list(open_csv(path, ["id", "text"]))
    assert rows == [(2, {"id": "1", "text": note})]


def test_short_row_is_a_ragged_row_error(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("Hours,Heart Rate,Alert\n0.5,80,yes\n1.5,81\n")
    with pytest.raises(DataError, match=r"ragged row.*2 fields, header has 3.*s\.csv.*row 3"):
        list(open_csv(path, ["Hours"]))
    assert [r for _, r in open_csv(path, short_rows="blank")][1]["Alert"] is None


def test_missing_column_error_does_not_print_the_header(tmp_path):
    path = tmp_path / "headerless.csv"
    path.write_text(f"p1,{SECRET},42\np2,other,43\n")      # no header: the first data row is read as one
    with pytest.raises(DataError) as err:
        list(open_csv(path, ["patient_id"]))
    msg = str(err.value)
    assert "'patient_id'" in msg and "3 column(s)" in msg and SECRET not in msg


def test_decompression_bomb_is_image_too_large(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)     # 64*64 > 2 * 100: a bomb
    with pytest.raises(RecordError, match="image too large"):
        read_image(path)


def test_cbis_pathology_cell_is_printed_only_when_it_is_a_short_code(tmp_path):
    cbis_tree(tmp_path, {"mass_train": [cbis_row("P_1", "Mass-Training_P_1_LEFT_CC", pathology=SECRET + " x y"),
                                         cbis_row("P_2", "Mass-Training_P_2_LEFT_CC", pathology="MAYBE")]})
    quarantine = tmp_path / "q.jsonl"
    log = IngestLog("cbis", quarantine_path=quarantine)
    from kdscale.data.sources.cbis import CbisConfig, CbisSource
    assert list(CbisSource(CbisConfig(root=str(tmp_path))).records(log)) == []
    log.close()
    text = quarantine.read_text()
    assert SECRET not in text and "<unexpected value>" in text and "'MAYBE'" in text


# -- manifest time series ---------------------------------------------------------------------

@pytest.mark.parametrize("series,reason", [
    ("Hours,Heart Rate\n0.5,nan\n1.5,80\n", "non-finite EHR value"),
    ("Hours,Heart Rate\n0.5,inf\n", "non-finite EHR value"),
    ("Hours,Heart Rate\n", "empty time series"),
    ("Hours,Heart Rate\n0.5,80\n1e12,81\n", "implausible series length"),   # end = last Hours
    ("Hours,Heart Rate,Alert\n0.5,80,yes\n1.5,81\n", "unreadable time series"),  # ragged (short) row
])
def test_manifest_series_problems_are_counted_skips(tmp_path, series, reason):
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/p1.csv").write_text(series)
    make_tree(tmp_path, [base_row(1, ts="ts/p1.csv"), base_row(2)])
    quarantine = tmp_path / "q.jsonl"
    records, log = manifest_read(config(tmp_path, boxes=None, on_bad_modality="skip_sample"),
                                 quarantine_path=quarantine)
    log.close()
    assert [r.key for r in records] == ["s2"] and dict(log.skipped) == {reason: 1}
    entry = json.loads(quarantine.read_text())
    assert entry["reason"] == reason and entry["row"] == 2


def test_manifest_series_unknown_categorical_is_a_note(tmp_path):
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts/p1.csv").write_text("Hours,Heart Rate,Alert\n0.5,80,maybe\n1.5,fast,no\n")
    make_tree(tmp_path, [base_row(1, ts="ts/p1.csv")])
    records, log = manifest_read(config(tmp_path, boxes=None))
    assert len(records) == 1 and log.n_skipped == 0
    assert log.notes["ehr: unknown categorical value treated as missing"] == 1
    assert log.notes["ehr: non numeric value treated as missing"] == 1


# -- keys and reprs ---------------------------------------------------------------------------

def test_safe_key_keeps_clean_ids_and_separates_replaced_ones():
    assert safe_key("p1", "s-2", "a_b") == "p1_s-2_a_b"                 # nothing replaced: unchanged
    keys = {safe_key(p) for p in ("a b", "a-b", "a.b", "a/b", "a  b")}
    assert len(keys) == 5 and "a-b" in keys
    assert safe_key("a b").startswith("a-b_") and safe_key("a b") == safe_key("a b")   # deterministic
    with pytest.raises(RecordError):
        safe_key("..", " ")


def test_record_repr_never_shows_patient_content():
    note = f"{SECRET} patient has a cough"
    record = Record(key="k1", patient_id="p1", split="train", labels=np.zeros(1), image=b"\xff\xd8JPEGDATA",
                    image_size=(2, 2), ehr=np.full((2, 3), 123.25), report=note,
                    tabular={"smoker_note": f"{SECRET} tabular"},
                    boxes=[Box("lesion", 0, 0, 1, 1, mask_png=b"MASKBYTES")])
    text = repr(record) + str(record) + repr(record.boxes)
    assert "k1" in text and "p1" in text
    for leak in (SECRET, "JPEGDATA", "123.25", "MASKBYTES"):
        assert leak not in text, leak
