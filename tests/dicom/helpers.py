"""Small generated DICOM instances for SCU/retrieval tests (64x64 CR, explicit VR little endian)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_cr(
    *,
    patient_id: str = "P1",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    study_date: str = "20120315",
    modality: str = "CR",
    body_part: str = "CHEST",
    study_description: str = "CHEST PA",
    series_description: str = "PA",
    accession: str = "ACC1",
    series_number: int = 1,
    instance_number: int = 1,
    seed: int = 0,
) -> Dataset:
    """One small CR instance with a deterministic 64x64 16-bit image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientSex = "F"
    ds.PatientBirthDate = "19800101"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = study_date
    ds.StudyTime = "101010"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
    return ds


@dataclass
class GeneratedStudy:
    study_uid: str
    study_date: str
    series: dict[str, list[str]] = field(default_factory=dict)  # series uid -> SOP uids

    @property
    def sop_uids(self) -> list[str]:
        return [u for uids in self.series.values() for u in uids]


def make_studies(
    outdir: Path,
    dates: list[str],
    *,
    series_per_study: int = 1,
    instances_per_series: int = 2,
    patient_prefix: str = "P",
    **kw,
) -> list[GeneratedStudy]:
    """Write one study per date (files under outdir) and describe what was made."""
    outdir.mkdir(parents=True, exist_ok=True)
    studies = []
    n = 0
    for i, date in enumerate(dates):
        st = GeneratedStudy(study_uid=generate_uid(), study_date=date)
        for s in range(series_per_study):
            se_uid = generate_uid()
            st.series[se_uid] = []
            for k in range(instances_per_series):
                ds = make_cr(patient_id=f"{patient_prefix}{i}", study_uid=st.study_uid, series_uid=se_uid,
                             study_date=date, series_number=s + 1, instance_number=k + 1, seed=n,
                             accession=f"A{i}", **kw)
                ds.save_as(outdir / f"{n:05d}.dcm", enforce_file_format=True)
                st.series[se_uid].append(ds.SOPInstanceUID)
                n += 1
        studies.append(st)
    return studies


def find_answer(ds: Dataset, identifier: Dataset) -> Dataset:
    """What a conformant PACS answers for `ds` to a C-FIND `identifier`: every requested key that
    the instance has (for the fake PACSs of the tests; matching is theirs to do, or not)."""
    rsp = Dataset()
    rsp.QueryRetrieveLevel = identifier.QueryRetrieveLevel
    for elem in identifier:
        if elem.keyword and elem.keyword != "QueryRetrieveLevel" and elem.keyword in ds:
            setattr(rsp, elem.keyword, ds.data_element(elem.keyword).value)
    return rsp


def upload_all(orthanc, paths) -> None:
    for p in paths:
        orthanc.upload(p)


FINISHED = frozenset({"completed", "partial", "failed", "cancelled"})


def wait_retrieval(client, rid: int, want=FINISHED, timeout: float = 60) -> dict:
    """Poll GET /api/v1/retrievals/{rid} until its status is one of `want`; fail the test otherwise."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/api/v1/retrievals/{rid}").json()
        if body["status"] in want:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"retrieval {rid} stuck in {body['status']}: {body}")
        time.sleep(0.1)
