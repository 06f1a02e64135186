"""Indiana University chest X-ray reports (OpenI ``NLMCXR_reports.tgz``) -> report-only Records.

The archive holds one OpenI XML file per radiology report, ``ecgen-radiology/<n>.xml``. It is
read straight from the .tgz as a stream (nothing is extracted to disk). From each report:

* the report id: ``<IUXRId id="n">``; key ``iu_<n>``;
* the text: the ``<AbstractText Label="...">`` sections named in ``sections`` (default FINDINGS
  then IMPRESSION), each stripped, empty ones left out, joined with "\\n". The collection's
  anonymisation tokens ("XXXX") are kept as they are. A report whose chosen sections are all
  empty is a counted skip ("report text empty");
* the labels: from the MeSH ``<major>`` terms (``<automatic>`` terms are ignored). A term such as
  "Opacity/lung/base/left" is matched on its first component ("Opacity"), ignoring case and
  surrounding spaces. A ``mesh`` label is 1 when one of the report's terms matches one of its
  names; a ``none_of`` label (``abnormal``) is 1 when the report is indexed and none of its terms
  matches (so abnormal = 0 exactly for the reports indexed "normal");
* not indexed: a report whose major terms are all in ``unindexed_terms`` ("No Indexing") was not
  coded, so its labels are unknown (NaN) by default (``unindexed: negative`` makes them 0,
  ``skip`` skips the report, counted as "not indexed");
* meta: report id, the archive and member, the major MeSH terms (the label source: metadata
  derived from the labels, not an input) and the ids of the report's images (``<parentImage>``).
  The images themselves are not in this archive: records are report-only.

Splits: IU X-ray publishes no patient ids, so each report is treated as its own patient
(``patient_id`` = report id) and split by a deterministic hash of the report id. Two studies of
one patient may therefore land in different splits; this leakage cannot be excluded.

Bad input: a missing or unreadable archive is a DataError naming the path; a member that is not
well-formed XML ("malformed XML"), lacks a report id ("missing report id") or has empty text is
a counted skip whose detail names the member. Skip details and errors carry member names,
section names and parser positions only, never report text.
"""
from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import Iterator, Optional
from xml.etree import ElementTree as ET

import numpy as np

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import SPLITS, Record, RecordError, safe_key
from kdscale.data.sources.base import guarded
from kdscale.data.sources.cbis import hash_fraction
from kdscale.data.sources.iu_xray_config import (SECTION_NAMES, IuLabelSpec,  # noqa: F401  (re-exported)
                                                IuXrayConfig, default_labels)

MAX_MEMBER_BYTES = 8 << 20   # a report is a few KiB; a larger member is a counted skip, not a memory spike


def _norm(value: str) -> str:
    return value.strip().casefold()


def _first_component(term: str) -> str:
    return _norm(term.split("/", 1)[0])


class IuXraySource:
    name = "iu_xray"

    def __init__(self, cfg: IuXrayConfig):
        self.cfg = cfg
        self.archive = Path(cfg.archive)
        self.label_names = [spec.name for spec in cfg.labels]
        self.sections = [s.strip().upper() for s in cfg.sections]
        self._unindexed = {_norm(t) for t in cfg.unindexed_terms}
        self._specs = [(spec, {_norm(m) for m in (spec.mesh or spec.none_of)}) for spec in cfg.labels]

    def describe(self) -> dict:
        cfg = self.cfg
        return {
            "name": self.name,
            "archive": str(self.archive),
            "label_names": self.label_names,
            "labels": [{"name": s.name, "mesh": s.mesh, "none_of": s.none_of} for s in cfg.labels],
            "label_rule": "first component of the MeSH <major> terms, case-insensitive",
            "unindexed": {"terms": cfg.unindexed_terms, "labels": cfg.unindexed},
            "modalities": ["report"],
            "sections": self.sections,
            "privileged_note": "report text is a privileged (teacher-only) input; these records have no image",
            "splits": (f"report-level hash (seed {cfg.split_seed}) {cfg.split_fractions}; IU X-ray has no "
                       "patient ids, so leakage across studies of one patient cannot be excluded"),
            "ehr_feature_names": None,
        }

    # -- records -----------------------------------------------------------------------------
    def records(self, log: IngestLog) -> Iterator[Record]:
        return guarded(self._stream(log), log, self.name)

    def _members(self, log: IngestLog) -> Iterator[tuple[str, Optional[bytes]]]:
        """(member name, bytes) for each regular .xml member; bytes None = too large."""
        if not self.archive.is_file():
            raise DataError("IU X-ray report archive not found", file=self.archive)
        try:
            with tarfile.open(self.archive, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if not member.name.lower().endswith(".xml"):
                        log.note("non-XML archive member ignored")
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        yield member.name, None
                        continue
                    fh = tar.extractfile(member)
                    yield member.name, fh.read() if fh is not None else b""
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"unreadable IU X-ray report archive (not a readable .tgz or truncated): "
                            f"{type(exc).__name__}: {exc}", file=self.archive) from None

    def _stream(self, log: IngestLog) -> Iterator[Record]:
        for member, data in self._members(log):
            log.count_read()
            key = ""
            try:
                if data is None:
                    raise RecordError(f"member too large: {member} is over {MAX_MEMBER_BYTES} bytes")
                root = self._parse(member, data)
                report_id = self._report_id(root, member)
                key = safe_key("iu", report_id)
                record = self._record(root, member, report_id, key, log)
            except RecordError as exc:
                reason, _, detail = str(exc).partition(": ")
                log.skip(reason, detail, key=key, file=self.archive)
                continue
            yield record

    @staticmethod
    def _parse(member: str, data: bytes) -> ET.Element:
        try:
            return ET.fromstring(data)
        except ET.ParseError as exc:  # the message is a position ("line 3, column 5"), never text
            raise RecordError(f"malformed XML: {member}: {exc}") from None

    @staticmethod
    def _report_id(root: ET.Element, member: str) -> str:
        id_el = root.find("IUXRId")
        report_id = (id_el.get("id") or "").strip() if id_el is not None else ""
        if not report_id:
            raise RecordError(f"missing report id: {member} has no <IUXRId id=...>")
        try:
            safe_key("iu", report_id)
        except RecordError:
            raise RecordError(f"bad report id: {member}: the id gives no safe key") from None
        return report_id

    def _record(self, root: ET.Element, member: str, report_id: str, key: str, log: IngestLog) -> Record:
        text = self._text(root)
        if not text:
            raise RecordError(f"report text empty: {member}: sections {self.sections} are empty")
        majors = [t for t in ("".join(el.itertext()).strip() for el in root.iter("major")) if t]
        labels = self._labels(majors, member, log)
        images = [el.get("id", "").strip() for el in root.iter("parentImage") if el.get("id", "").strip()]
        if not images:
            log.note("report lists no images")
        meta = {"report_id": report_id, "source_file": str(self.archive), "source_member": member,
                "mesh_major": majors, "image_ids": images}
        return Record(key=key, patient_id=report_id, split=self._split(report_id), labels=labels, report=text,
                      meta=meta)

    def _text(self, root: ET.Element) -> str:
        found: dict[str, list[str]] = {}
        for el in root.iter("AbstractText"):
            label = (el.get("Label") or "").strip().upper()
            part = "".join(el.itertext()).strip()
            if label in self.sections and part:
                found.setdefault(label, []).append(part)
        return "\n".join(part for section in self.sections for part in found.get(section, []))

    def _labels(self, majors: list[str], member: str, log: IngestLog) -> np.ndarray:
        terms = {_first_component(t) for t in majors}
        if not terms - self._unindexed:
            if self.cfg.unindexed == "skip":
                raise RecordError(f"not indexed: {member} has no MeSH major term other than "
                                  f"{self.cfg.unindexed_terms}")
            log.note(f"report not indexed (labels {self.cfg.unindexed})")
            fill = np.nan if self.cfg.unindexed == "unknown" else 0.0
            return np.full(len(self._specs), fill, dtype=np.float32)
        values = [float(bool(terms & names)) if spec.mesh else float(not terms & names)
                  for spec, names in self._specs]
        return np.asarray(values, dtype=np.float32)

    def _split(self, report_id: str) -> str:
        frac, edge = hash_fraction("iu-xray-split", self.cfg.split_seed, report_id), 0.0
        for split in SPLITS:
            edge += self.cfg.split_fractions.get(split, 0.0)
            if frac < edge:
                return split
        return max(self.cfg.split_fractions, key=self.cfg.split_fractions.get)
