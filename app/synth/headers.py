"""Realistic, messy DICOM headers for the phantoms, with the truth kept apart.

Two steps: `plan()` decides, sequentially and deterministically, which patient and study every
instance belongs to (follow-ups, patients in several classes, header errors); `build_dataset()`
then turns one planned instance into a pydicom Dataset using that instance's own RNG, so the
output does not depend on how instances are spread over worker processes.

What varies on purpose: CR and DX SOP classes from several vendor profiles; BodyPartExamined
variants (including empty when a description still names the part); laterality in Laterality,
ImageLaterality, both, or only in descriptions; English and Japanese descriptions (full- and
half-width); PatientAge present or absent; PatientSex M/F/O/empty.

Header errors (a configurable fraction, recorded in the truth file only):
- ``laterality_swapped``: every laterality cue (tags and descriptions) names the other side;
- ``body_part_wrong``: BodyPartExamined names another body part, descriptions are left as they were;
- ``body_part_blank``: BodyPartExamined empty and no description names the body part.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid

from app.synth.render import XR5, XR10, Subject

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; deterministic suffix from the seed

TAXONOMIES = {"xr10": XR10, "xr5": XR5}
HEADER_ERRORS = ("laterality_swapped", "body_part_wrong", "body_part_blank")
DATE_MIN = dt.date(2011, 1, 1)
DATE_MAX = dt.date(2016, 12, 31)

# detector sizes as (cols, rows)
DETECTORS = {"2048x2500": (2048, 2500), "1760x2140": (1760, 2140), "1020x1275": (1020, 1275)}


@dataclass(frozen=True)
class Vendor:
    key: str
    manufacturer: str
    model: str
    modality: str  # CR or DX
    photometric: str
    bits_stored: int
    detector: str
    ts_weights: dict[str, float]
    japanese: float  # probability that descriptions are in Japanese
    charset: str  # default SpecificCharacterSet when everything is ASCII ("" = absent)
    voi_lut: float = 0.0  # probability of a VOI LUT Sequence
    window: float = 0.5  # probability of WindowCenter/Width


VENDORS = (
    Vendor("fuji", "FUJIFILM Corporation", "FCR PROFECT CS", "CR", "MONOCHROME1", 10, "1760x2140",
           {"jpeg_sv1": 0.45, "explicit": 0.25, "rle": 0.15, "jpegls": 0.15}, 0.75, "ISO_IR 100", 0.0, 0.8),
    Vendor("konica", "KONICA MINOLTA", "REGIUS MODEL 190", "CR", "MONOCHROME1", 12, "1020x1275",
           {"explicit": 0.4, "jpegls": 0.3, "j2k": 0.3}, 0.7, "", 0.0, 0.6),
    Vendor("canon", "Canon Inc.", "CXDI-70C Wireless", "DX", "MONOCHROME2", 12, "2048x2500",
           {"explicit": 0.5, "j2k": 0.3, "jpeg_sv1": 0.2}, 0.5, "ISO_IR 100", 0.2, 0.7),
    Vendor("ge", "GE Healthcare", "Definium 6000", "DX", "MONOCHROME1", 14, "2048x2500",
           {"explicit": 0.6, "j2k": 0.2, "rle": 0.2}, 0.2, "", 0.4, 0.9),
    Vendor("carestream", "Carestream Health", "DRX-Evolution", "DX", "MONOCHROME2", 16, "1760x2140",
           {"explicit": 0.4, "jpegls": 0.3, "rle": 0.3}, 0.3, "ISO_IR 100", 0.0, 0.4),
    Vendor("shimadzu", "SHIMADZU Corporation", "RADspeed Pro", "DX", "MONOCHROME2", 12, "1020x1275",
           {"explicit": 0.3, "jpeg_sv1": 0.3, "j2k": 0.2, "rle": 0.2}, 0.8, "", 0.5, 0.5),
)


# ------------------------------------------------------------------------ classes -> anatomy
def class_subject(cls: str, taxonomy: str, rng: np.random.Generator) -> tuple[str, str, str, tuple[int, int] | None]:
    """(region, side, sex, age range) for a true class; side/sex/age drawn where the class leaves them free."""
    if cls == "W":
        return "waters", "", "", None
    if cls == "Ps":
        return "sinus_pa", "", "", None
    if cls == "H":
        return "head_pa", "", "", None
    if cls in ("LtE", "RtE"):
        return "elbow", cls[0], "", None
    if cls in ("LtK", "RtK"):
        return "knee", cls[0], "", None
    if cls == "E":
        return "elbow", "LR"[int(rng.integers(2))], "", None
    if cls == "K":
        return "knee", "LR"[int(rng.integers(2))], "", None
    if cls.startswith("C") and len(cls) == 4:
        lo = int(cls[1:3])
        return "chest", "", cls[3], (lo, lo + 9)
    if cls == "C":
        return "chest", "", "FM"[int(rng.integers(2))], (20, 85)
    raise ValueError(f"unknown class {cls!r} for taxonomy {taxonomy}")


# ------------------------------------------------------------------------ patients & plan
SURNAMES = [("Sato", "佐藤", "さとう"), ("Suzuki", "鈴木", "すずき"), ("Takahashi", "高橋", "たかはし"),
            ("Tanaka", "田中", "たなか"), ("Watanabe", "渡辺", "わたなべ"), ("Ito", "伊藤", "いとう"),
            ("Yamamoto", "山本", "やまもと"), ("Nakamura", "中村", "なかむら"), ("Kobayashi", "小林", "こばやし"),
            ("Kato", "加藤", "かとう"), ("Yoshida", "吉田", "よしだ"), ("Yamada", "山田", "やまだ")]
GIVEN = {"F": [("Hanako", "花子", "はなこ"), ("Yuki", "由紀", "ゆき"), ("Aiko", "愛子", "あいこ"),
               ("Keiko", "恵子", "けいこ"), ("Misaki", "美咲", "みさき"), ("Naomi", "直美", "なおみ")],
         "M": [("Taro", "太郎", "たろう"), ("Hiroshi", "浩", "ひろし"), ("Kenji", "健二", "けんじ"),
               ("Takeshi", "武", "たけし"), ("Daisuke", "大輔", "だいすけ"), ("Shota", "翔太", "しょうた")]}


@dataclass
class Patient:
    key: int
    patient_id: str
    name: str
    sex: str  # true sex F/M
    birth: dt.date
    classes: set[str] = field(default_factory=set)
    studies: list[dt.date] = field(default_factory=list)


@dataclass
class PlannedInstance:
    index: int
    true_class: str
    region: str
    side: str
    sex: str
    age: int
    patient: Patient
    study_date: dt.date
    study_no: int  # global study counter (UIDs)
    vendor: Vendor
    syntax: str
    header_error: str  # "" or one of HEADER_ERRORS


def _age(birth: dt.date, on: dt.date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _rand_date(rng, lo: dt.date = DATE_MIN, hi: dt.date = DATE_MAX) -> dt.date:
    return lo + dt.timedelta(days=int(rng.integers(0, (hi - lo).days + 1)))


def _new_patient(rng, key: int, sex: str, age_range: tuple[int, int] | None, on: dt.date) -> Patient:
    lo, hi = age_range or (3, 90)
    age = int(rng.integers(lo, hi + 1))
    birth = dt.date(on.year - age - 1, on.month, min(on.day, 28)) + dt.timedelta(days=int(rng.integers(1, 365)))
    while _age(birth, on) > age:
        birth += dt.timedelta(days=20)
    while _age(birth, on) < age:
        birth -= dt.timedelta(days=20)
    sur = SURNAMES[int(rng.integers(len(SURNAMES)))]
    giv = GIVEN[sex][int(rng.integers(len(GIVEN[sex])))]
    if rng.random() < 0.3:  # Japanese: alphabetic=ideographic=phonetic groups
        name = f"{sur[0]}^{giv[0]}={sur[1]}^{giv[1]}={sur[2]}^{giv[2]}"
    else:
        name = f"{sur[0].upper()}^{giv[0].upper()}"
    pid = f"{int(rng.integers(10**7, 10**8))}"
    return Patient(key, pid, name, sex, birth)


def plan(taxonomy: str, per_class: int, seed: int, header_error_rate: float = 0.0,
         follow_up_rate: float = 0.12, cross_class_rate: float = 0.08,
         syntaxes: list[str] | None = None) -> list[PlannedInstance]:
    """Every instance's class, patient, study and header choices: sequential, so deterministic.

    `syntaxes` restricts transfer syntaxes (uniform among them) instead of each vendor's mix.
    """
    from app.synth.codecs import TRANSFER_SYNTAXES

    if syntaxes is not None:
        bad = sorted(set(syntaxes) - set(TRANSFER_SYNTAXES))
        if bad or not syntaxes:
            raise ValueError(f"unknown transfer syntax {bad}; choose from {sorted(TRANSFER_SYNTAXES)}")
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"unknown taxonomy {taxonomy!r}; choose from {sorted(TAXONOMIES)}")
    if not 0.0 <= header_error_rate <= 1.0:
        raise ValueError("header_error_rate must be within 0..1")
    classes = TAXONOMIES[taxonomy]
    rng = np.random.default_rng([seed, 0xC1A55])
    patients: list[Patient] = []
    by_class: dict[str, list[Patient]] = {c: [] for c in classes}
    order = [c for c in classes for _ in range(per_class)]
    rng.shuffle(order)  # interleave classes so follow-ups and cross-class reuse can happen
    out: list[PlannedInstance] = []
    for index, cls in enumerate(order):
        region, side, sex, age_range = class_subject(cls, taxonomy, rng)
        date = _rand_date(rng)
        patient: Patient | None = None
        u = rng.random()
        if u < follow_up_rate and by_class[cls]:
            cand = by_class[cls][int(rng.integers(len(by_class[cls])))]
            later = max(cand.studies) + dt.timedelta(days=int(rng.integers(60, 1100)))
            if later <= DATE_MAX and (age_range is None or age_range[0] <= _age(cand.birth, later) <= age_range[1]):
                patient, date = cand, later
        elif u < follow_up_rate + cross_class_rate and patients:
            for _ in range(8):
                cand = patients[int(rng.integers(len(patients)))]
                if cls in cand.classes or (sex and cand.sex != sex):
                    continue
                if age_range and not age_range[0] <= _age(cand.birth, date) <= age_range[1]:
                    continue
                patient = cand
                break
        if patient is None:
            psex = sex or "FM"[int(rng.integers(2))]
            patient = _new_patient(rng, len(patients), psex, age_range, date)
            patients.append(patient)
        if cls not in patient.classes:
            by_class[cls].append(patient)
        patient.classes.add(cls)
        patient.studies.append(date)
        vendor = VENDORS[int(rng.integers(len(VENDORS)))]
        names = list(vendor.ts_weights)
        w = np.array([vendor.ts_weights[n] for n in names])
        syntax = names[int(rng.choice(len(names), p=w / w.sum()))]
        if syntaxes is not None:
            syntax = syntaxes[int(rng.integers(len(syntaxes)))]
        error = ""
        if rng.random() < header_error_rate:
            kinds = HEADER_ERRORS if side else HEADER_ERRORS[1:]
            error = kinds[int(rng.integers(len(kinds)))]
        out.append(PlannedInstance(index, cls, region, side, sex or patient.sex, _age(patient.birth, date),
                                   patient, date, index, vendor, syntax, error))
    return out


def subject_of(p: PlannedInstance, rng: np.random.Generator) -> Subject:
    size = float(np.clip(rng.normal(1.0, 0.07), 0.82, 1.2))
    if p.region in ("elbow", "knee") and p.age < 12:
        size *= 0.75
    return Subject(p.region, p.side, p.sex, p.age, size)


# ------------------------------------------------------------------------ descriptions
def fullwidth(s: str) -> str:
    """ASCII letters/digits/punctuation to their full-width forms (as some Japanese systems store them)."""
    return "".join(chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) <= 0x7E else ("\u3000" if c == " " else c) for c in s)


# (English, Japanese) series description terms per region; laterality added separately
TERMS = {
    "waters": (["WATERS", "SINUS WATERS", "PNS OM", "Waters view"],
               ["ウォーターズ法", "副鼻腔 ウォーターズ", "ｳｫｰﾀｰｽﾞ", "副鼻腔ウォーターズ法"]),
    "sinus_pa": (["SINUS PA", "PNS PA", "Sinus Caldwell", "PARANASAL PA"],
                 ["副鼻腔", "副鼻腔 正面", "ﾌｸﾋﾞｸｳ PA", "副鼻腔正面（コールドウェル）"]),
    "head_pa": (["SKULL PA", "HEAD PA", "Skull frontal"], ["頭部正面", "頭部 PA", "ﾄｳﾌﾞ ｼｮｳﾒﾝ", "頭蓋骨正面"]),
    "elbow": (["ELBOW AP", "Elbow AP", "ELBOW FRONTAL"], ["肘関節正面", "肘関節 AP", "ﾋｼﾞ ｼｮｳﾒﾝ"]),
    "knee": (["KNEE AP", "Knee AP", "KNEE FRONTAL"], ["膝関節正面", "膝関節 AP", "ﾋｻﾞ ｼｮｳﾒﾝ"]),
    "chest": (["CHEST PA", "Chest PA", "CHEST P-A", "THORAX PA"], ["胸部正面", "胸部 PA", "ｷｮｳﾌﾞ PA", "胸部単純正面"]),
}
STUDY_TERMS = {
    "waters": (["XR SINUS", "PARANASAL SINUSES"], ["副鼻腔単純", "副鼻腔X線"]),
    "sinus_pa": (["XR SINUS", "PARANASAL SINUSES"], ["副鼻腔単純", "副鼻腔X線"]),
    "head_pa": (["XR SKULL", "SKULL"], ["頭部単純", "頭部X線"]),
    "elbow": (["XR ELBOW", "ELBOW 2 VIEWS"], ["肘関節単純", "肘X線"]),
    "knee": (["XR KNEE", "KNEE 2 VIEWS"], ["膝関節単純", "膝X線"]),
    "chest": (["XR CHEST", "CHEST"], ["胸部単純", "胸部X線"]),
}
NO_PART_TERMS = (["AP", "PA", "FRONTAL", "XR"], ["正面", "一般撮影", "単純撮影"])
BODY_PARTS = {
    "waters": (["SINUS", "PNS", "SKULL", "HEAD"], [0.4, 0.25, 0.25, 0.1]),
    "sinus_pa": (["SINUS", "PNS", "SKULL"], [0.45, 0.3, 0.25]),
    "head_pa": (["SKULL", "HEAD"], [0.7, 0.3]),
    "elbow": (["ELBOW", "EXTREMITY", "ARM"], [0.6, 0.3, 0.1]),
    "knee": (["KNEE", "EXTREMITY", "LEG"], [0.65, 0.25, 0.1]),
    "chest": (["CHEST", "THORAX"], [0.8, 0.2]),
}
VIEW = {"waters": ["", "PA", "OM"], "sinus_pa": ["PA", "PA", ""], "head_pa": ["PA", "PA", ""],
        "elbow": ["AP", "AP", ""], "knee": ["AP", "AP", ""], "chest": ["PA", "PA", ""]}


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _lat_text(side: str, japanese: bool, rng) -> tuple[str, bool]:
    """A laterality phrase and whether it goes before the term."""
    if japanese:
        jp = {"L": "左", "R": "右"}[side]
        return _pick(rng, [(f"（{jp}）", False), (f"({jp})", False), (jp, True), (f"({side})", False)])
    en = {"L": ("L", "LT", "LEFT"), "R": ("R", "RT", "RIGHT")}[side]
    return _pick(rng, [(en[0], True), (en[1], False), (en[2], True), (f"({en[0]})", False)])


# ------------------------------------------------------------------------ dataset
def uid(seed: int, *parts) -> str:
    return generate_uid(UID_PREFIX, entropy_srcs=[str(seed), *map(str, parts)])


@dataclass
class HeaderInfo:
    """Choices made while building a header that the renderer needs too."""

    photometric: str
    bits_stored: int
    rows: int
    cols: int
    marker: bool
    burned_in: bool


def build_dataset(p: PlannedInstance, seed: int, rng: np.random.Generator,
                  size: tuple[int, int] | None = None) -> tuple[Dataset, HeaderInfo]:
    """The header of one planned instance (no pixel data yet)."""
    v = p.vendor
    cols, rows = size or DETECTORS[v.detector]
    pat = p.patient
    japanese = rng.random() < v.japanese
    lang = 1 if japanese else 0
    side_hdr = {"L": "R", "R": "L"}.get(p.side, "") if p.header_error == "laterality_swapped" else p.side

    # laterality placement: tags, both, or descriptions only
    lat_mode = _pick(rng, ["Laterality", "ImageLaterality", "both", "desc"]) if p.side else ""
    lat_in_desc = lat_mode == "desc" or (lat_mode and rng.random() < 0.5)

    if p.header_error == "body_part_blank":
        series_desc = _pick(rng, NO_PART_TERMS[lang])
        study_desc = _pick(rng, NO_PART_TERMS[lang]) if rng.random() < 0.5 else ""
        protocol = ""
    else:
        series_desc = _pick(rng, TERMS[p.region][lang])
        study_desc = _pick(rng, STUDY_TERMS[p.region][lang])
        protocol = _pick(rng, TERMS[p.region][0]) if rng.random() < 0.5 else ""
    if lat_in_desc and side_hdr:
        phrase, before = _lat_text(side_hdr, japanese, rng)
        series_desc = (f"{phrase}{series_desc}" if japanese else f"{phrase} {series_desc}") if before \
            else f"{series_desc}{phrase}" if japanese else f"{series_desc} {phrase}"
        if protocol:
            protocol = f"{protocol} {'LT' if side_hdr == 'L' else 'RT'}"
    if not japanese and rng.random() < 0.08:
        series_desc = fullwidth(series_desc)  # full-width Latin, as some Japanese RIS store it

    # body part: normal variants (empty only when a description still names the part), or errors
    parts, weights = BODY_PARTS[p.region]
    body_part = parts[int(rng.choice(len(parts), p=np.array(weights) / sum(weights)))]
    if p.header_error == "body_part_blank":
        body_part = ""
    elif p.header_error == "body_part_wrong":
        others = sorted({bp for r, (bps, _) in BODY_PARTS.items() if r != p.region for bp in bps}
                        - set(parts))
        body_part = _pick(rng, others)
    elif rng.random() < 0.1:
        body_part = ""

    ds = Dataset()
    institution = "合成総合病院" if japanese and rng.random() < 0.5 else "SYNTHETIC GENERAL HOSPITAL"
    text = [series_desc, study_desc, protocol, pat.name, institution]
    if any(any(ord(c) > 127 for c in t) for t in text):
        ds.SpecificCharacterSet = "ISO_IR 192"
    elif v.charset:
        ds.SpecificCharacterSet = v.charset

    sop_class = CR_STORAGE if v.modality == "CR" else DX_PRESENTATION_STORAGE
    study_uid = uid(seed, "study", p.study_no)
    series_uid = uid(seed, "series", p.index)
    sop_uid = uid(seed, "instance", p.index)
    date = p.study_date.strftime("%Y%m%d")
    time = f"{int(rng.integers(8, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"

    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = f"A{seed % 1000:03d}{p.study_no:07d}"
    ds.Modality = v.modality
    ds.Manufacturer = v.manufacturer
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = ""
    ds.StationName = f"{v.key.upper()}{int(rng.integers(1, 4))}"
    if study_desc:
        ds.StudyDescription = study_desc
    ds.SeriesDescription = series_desc
    ds.ManufacturerModelName = v.model
    ds.PatientName = pat.name
    ds.PatientID = pat.patient_id
    ds.PatientBirthDate = pat.birth.strftime("%Y%m%d")
    u = rng.random()
    ds.PatientSex = pat.sex if u < 0.93 else ("" if u < 0.97 else "O")
    if rng.random() < 0.6:
        ds.PatientAge = f"{p.age:03d}Y"
    ds.BodyPartExamined = body_part
    if protocol:
        ds.ProtocolName = protocol
    if v.modality == "CR" and rng.random() < 0.7:
        ds.AcquisitionDeviceProcessingDescription = series_desc
    ds.KVP = f"{int(rng.integers(50, 125))}"
    ds.ExposureTime = str(int(rng.integers(5, 60)))
    ds.XRayTubeCurrent = str(int(rng.integers(100, 500)))
    ds.DistanceSourceToDetector = "1800" if p.region == "chest" else "1000"
    ds.SoftwareVersions = f"V{int(rng.integers(1, 9))}.{int(rng.integers(0, 20))}"
    ds.ViewPosition = _pick(rng, VIEW[p.region])
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{p.study_no + 1}"
    ds.SeriesNumber = int(rng.integers(1, 5))
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    if lat_mode in ("Laterality", "both"):
        ds.Laterality = side_hdr
    if lat_mode in ("ImageLaterality", "both"):
        ds.ImageLaterality = side_hdr

    photometric = v.photometric if rng.random() < 0.85 else (
        "MONOCHROME2" if v.photometric == "MONOCHROME1" else "MONOCHROME1")
    bits = v.bits_stored
    if rng.random() < 0.2:  # the same model configured differently at another site
        bits = int(np.clip(bits + _pick(rng, [-2, 2]), 10, 16))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    marker = rng.random() < 0.85
    burned_in = rng.random() < 0.6
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    if v.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds, HeaderInfo(photometric, bits, rows, cols, marker, burned_in)


def add_spacing(ds: Dataset, spacing_mm: float, rng: np.random.Generator) -> None:
    sp = f"{spacing_mm:.4f}"
    ds.ImagerPixelSpacing = [sp, sp]
    if ds.Modality == "CR" or rng.random() < 0.5:
        ds.PixelSpacing = [sp, sp]


def add_voi(ds: Dataset, arr_lo: int, arr_hi: int, rng: np.random.Generator, vendor: Vendor) -> None:
    """Window tags and, for some vendors, a VOI LUT Sequence (a sigmoid over the used pixel range)."""
    if rng.random() < vendor.window:
        ds.WindowCenter = f"{(arr_lo + arr_hi) / 2:.0f}"
        ds.WindowWidth = f"{max(arr_hi - arr_lo, 2):.0f}"
    if rng.random() < vendor.voi_lut:
        n = int(min(max(arr_hi - arr_lo + 1, 2), 65535))  # one entry per stored value in the range
        out_bits = 12
        x = np.linspace(-3, 3, n)
        lut = ((1 / (1 + np.exp(-x))) * ((1 << out_bits) - 1)).astype("<u2")
        item = Dataset()
        item.add_new(0x00283002, "US", [n, int(arr_lo), out_bits])  # LUTDescriptor
        item.LUTExplanation = "SIGMOID"
        item.add_new(0x00283006, "OW", lut.tobytes())  # LUTData
        ds.VOILUTSequence = [item]
