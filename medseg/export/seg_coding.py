"""What each segment of a DICOM SEG is: class names → SNOMED CT codes.

A DICOM SEG segment must say what it segments with two codes: a category from DICOM
CID 7150 (anatomical structure, tissue, morphologically abnormal structure, body
substance) and a type, usually from CID 7151 (liver, kidney, neoplasm, ...). A viewer
or PACS shows, colours and searches segments by these codes, not by the free-text
label, so "liver" coded as generic tissue is a liver nobody can find.

Class names come from training configs and are matched to the table below case-
insensitively, with ``_``/``-`` read as spaces, plurals as singulars and a ``left``/
``right`` word as a laterality modifier (``kidney_left`` → Kidney + Left). Every code
is one pydicom ships in ``pydicom.sr.codedict`` (SNOMED CT unless marked NCIt), so none
is typed from memory. A config's ``data.classes_coding`` overrides the table per class;
a name nobody knows gets the generic Tissue/Tissue pair and keeps its own name as the
segment label, which is what the standard's generic codes are for.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.sr.coding import Code

__all__ = ["SegmentCoding", "code_from_mapping", "known_names", "normalise_name", "segment_coding"]

# Category keys of the table (DICOM CID 7150) → pydicom codedict names.
_CATEGORIES = {
    "anatomy": "AnatomicalStructure",
    "tissue": "Tissue",
    "abnormal": "MorphologicallyAbnormalStructure",
    "substance": "BodySubstance",
}

# (category, type code name in pydicom's codedict[, scheme]): names a class may be called.
# Names are written normalised: lower case, single spaces, singular. Scheme is SCT unless given.
_TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # abdomen
    ("anatomy", "Liver", ("liver",)),
    ("anatomy", "Spleen", ("spleen",)),
    ("anatomy", "Kidney", ("kidney",)),
    ("anatomy", "Pancreas", ("pancreas",)),
    ("anatomy", "Stomach", ("stomach",)),
    ("anatomy", "Gallbladder", ("gallbladder", "gall bladder")),
    ("anatomy", "Esophagus", ("esophagus", "oesophagus")),
    ("anatomy", "Duodenum", ("duodenum",)),
    ("anatomy", "SmallIntestine", ("small intestine", "small bowel")),
    ("anatomy", "LargeIntestine", ("large intestine", "large bowel")),
    ("anatomy", "Colon", ("colon",)),
    ("anatomy", "Rectum", ("rectum",)),
    ("anatomy", "AdrenalGland", ("adrenal gland", "adrenal")),
    ("anatomy", "Bladder", ("bladder", "urinary bladder")),
    ("anatomy", "Ureter", ("ureter",)),
    ("anatomy", "Prostate", ("prostate", "prostate gland")),
    ("anatomy", "PeripheralZoneOfTheProstate", ("peripheral zone", "prostate peripheral zone")),
    ("anatomy", "TransitionZoneOfTheProstate", ("transition zone", "prostate transition zone")),
    ("anatomy", "Uterus", ("uterus",)),
    ("anatomy", "Ovary", ("ovary",)),
    # thorax
    ("anatomy", "Lung", ("lung",)),
    ("anatomy", "Trachea", ("trachea",)),
    ("anatomy", "Bronchus", ("bronchus",)),
    ("anatomy", "Heart", ("heart",)),
    ("anatomy", "LeftVentricle", ("left ventricle",)),
    ("anatomy", "RightVentricle", ("right ventricle",)),
    ("anatomy", "LeftAtrium", ("left atrium",)),
    ("anatomy", "RightAtrium", ("right atrium",)),
    ("anatomy", "LeftVentricleMyocardium", ("myocardium", "left ventricle myocardium")),
    ("anatomy", "Breast", ("breast",)),
    ("anatomy", "Thyroid", ("thyroid", "thyroid gland")),
    ("anatomy", "Diaphragm", ("diaphragm",)),
    # vessels
    ("anatomy", "Aorta", ("aorta",)),
    ("anatomy", "InferiorVenaCava", ("inferior vena cava", "ivc")),
    ("anatomy", "SuperiorVenaCava", ("superior vena cava", "svc")),
    ("anatomy", "PortalVein", ("portal vein",)),
    ("anatomy", "SplenicVein", ("splenic vein",)),
    ("anatomy", "PulmonaryArtery", ("pulmonary artery",)),
    ("anatomy", "BloodVessel", ("vessel", "blood vessel", "hepatic vessel", "vasculature")),
    ("anatomy", "Artery", ("artery",)),
    ("anatomy", "Vein", ("vein",)),
    # head and nervous system
    ("anatomy", "Brain", ("brain",)),
    ("anatomy", "BrainStem", ("brain stem", "brainstem")),
    ("anatomy", "Cerebellum", ("cerebellum",)),
    ("anatomy", "Hippocampus", ("hippocampus", "hippocampal")),
    ("anatomy", "Thalamus", ("thalamus",)),
    ("anatomy", "Putamen", ("putamen",)),
    ("anatomy", "CaudateNucleus", ("caudate", "caudate nucleus")),
    ("anatomy", "Amygdala", ("amygdala",)),
    ("anatomy", "WhiteMatter", ("white matter",)),
    ("anatomy", "GrayMatter", ("gray matter", "grey matter")),
    ("anatomy", "LateralVentricle", ("lateral ventricle",)),
    ("anatomy", "BrainVentricle", ("brain ventricle",)),
    ("anatomy", "SpinalCord", ("spinal cord",)),
    ("anatomy", "Eye", ("eye", "eyeball")),
    # skeleton
    ("tissue", "Bone", ("bone",)),
    ("anatomy", "Spine", ("spine", "vertebral column", "spinal column")),
    ("anatomy", "Vertebra", ("vertebra",)),
    ("anatomy", "Rib", ("rib",)),
    ("anatomy", "Skull", ("skull",)),
    ("anatomy", "Pelvis", ("pelvis",)),
    ("anatomy", "Sacrum", ("sacrum",)),
    ("anatomy", "Femur", ("femur",)),
    ("anatomy", "Humerus", ("humerus",)),
    ("anatomy", "Scapula", ("scapula",)),
    ("anatomy", "Clavicle", ("clavicle",)),
    ("anatomy", "Sternum", ("sternum",)),
    # tissues and substances
    ("tissue", "MuscleTissue", ("muscle",)),
    ("tissue", "AdiposeTissue", ("fat", "adipose tissue", "adipose")),
    ("tissue", "SubcutaneousTissue", ("subcutaneous tissue", "subcutaneous fat")),
    ("tissue", "SoftTissue", ("soft tissue",)),
    ("anatomy", "Skin", ("skin",)),
    ("anatomy", "LymphNode", ("lymph node",)),
    ("substance", "CerebrospinalFluid", ("csf", "cerebrospinal fluid")),
    ("substance", "Blood", ("blood",)),
    ("substance", "Urine", ("urine",)),
    # abnormal structures
    ("abnormal", "Neoplasm", ("tumor", "tumour", "neoplasm", "cancer")),
    ("abnormal", "Lesion", ("lesion",)),
    ("abnormal", "Carcinoma", ("carcinoma",)),
    ("abnormal", "NeoplasmSecondary", ("metastasis", "metastase", "secondary neoplasm")),
    ("abnormal", "Mass", ("mass",)),
    ("abnormal", "Nodule", ("nodule",)),
    ("abnormal", "Cyst", ("cyst",)),
    ("abnormal", "Edema", ("edema", "oedema")),
    ("abnormal", "Necrosis", ("necrosis", "necrotic core")),
    ("abnormal", "Hemorrhage", ("hemorrhage", "haemorrhage")),
    ("abnormal", "NCIt:EnhancingLesion", ("enhancing tumor", "enhancing tumour", "enhancing lesion")),
    ("abnormal", "NCIt:NonEnhancingLesion", ("non enhancing tumor", "non enhancing tumour", "non enhancing lesion")),
    # microscopy
    ("anatomy", "Cell", ("cell",)),
    ("anatomy", "Nucleus", ("nucleus", "cell nucleus")),
)

# Plurals that dropping a final "s" does not undo.
_IRREGULAR = {
    "nuclei": "nucleus",
    "cell nuclei": "cell nucleus",
    "vertebrae": "vertebra",
    "metastases": "metastasis",
    "arteries": "artery",
    "bronchi": "bronchus",
    "ovaries": "ovary",
    "lymph nodes": "lymph node",
}
# Words that only say which part of a structure a class is (MSD's hippocampus "anterior"/"posterior").
_PARTS = {"anterior", "posterior", "head", "tail", "body"}
_SIDES = {"left": "Left", "l": "Left", "lt": "Left", "right": "Right", "r": "Right", "rt": "Right"}


@dataclass(frozen=True)
class SegmentCoding:
    """The codes one segment is written with; ``known`` is False for the generic fallback."""

    label: str
    category: Code
    type: Code
    modifier: Code | None = None
    known: bool = True


def normalise_name(name: str) -> str:
    """Lower case, accents folded, every run of non-alphanumerics one space: 'Kidney_Left' → 'kidney left'."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9]+", " ", text).strip()


@functools.cache
def _table() -> dict[str, tuple[Code, Code]]:
    from pydicom.sr.codedict import codes

    table: dict[str, tuple[Code, Code]] = {}
    for category, type_name, names in _TABLE:
        scheme, _, attr = type_name.rpartition(":")
        type_code = getattr(getattr(codes, scheme or "SCT"), attr)
        category_code = getattr(codes.SCT, _CATEGORIES[category])
        for name in names:
            table[name] = (category_code, type_code)
    return table


def known_names() -> list[str]:
    """Every (normalised) name the shipped table codes, e.g. for documentation and tests."""
    return sorted(_table())


def _singular(text: str) -> list[str]:
    if text in _IRREGULAR:
        return [_IRREGULAR[text]]
    forms = []
    if text.endswith("ies"):
        forms.append(text[:-3] + "y")
    if text.endswith("es"):
        forms.append(text[:-2])
    if text.endswith("s") and not text.endswith("ss"):
        forms.append(text[:-1])
    return forms


def _lookup(text: str) -> tuple[Code, Code] | None:
    table = _table()
    for form in [text, *_singular(text)]:
        if form in table:
            return table[form]
    return None


def _match(name: str) -> tuple[tuple[Code, Code], str | None] | None:
    """Table entry and laterality ('Left'/'Right') for a name, trying ever looser readings."""
    text = normalise_name(name)
    if not text:
        return None
    found = _lookup(text)
    if found:
        return found, None
    words = text.split()
    side = None
    sided = [w for i, w in enumerate(words) if w in _SIDES and (len(w) > 2 or i in (0, len(words) - 1))]
    if sided and len({_SIDES[w] for w in sided}) == 1 and len(sided) < len(words):
        side = _SIDES[sided[0]]
        words = [w for w in words if w not in sided]
        found = _lookup(" ".join(words))
        if found:
            return found, side
    core = [w for w in words if w not in _PARTS]
    if core and len(core) < len(words):
        found = _lookup(" ".join(core))
        if found:
            return found, side
    return None


def code_from_mapping(value: Any, where: str) -> Code:
    """A Code from ``{value, scheme, meaning}`` (config or checkpoint data, so checked here).

    ValueError/TypeError name ``where`` (e.g. ``classes_coding.liver.type``) and what is wrong.
    """
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: expected a mapping with value, scheme and meaning, got {type(value).__name__}")
    parts = {}
    for key in ("value", "scheme", "meaning"):
        text = value.get(key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}.{key}: missing or empty (e.g. value: '10200004', scheme: SCT, meaning: Liver)")
        parts[key] = text.strip()
    return Code(parts["value"], parts["scheme"], parts["meaning"])


def segment_coding(name: str, overrides: Mapping[str, Any] | None = None) -> SegmentCoding:
    """The category, type and optional laterality modifier for a class called ``name``.

    ``overrides`` is ``data.classes_coding`` from the config: class name → ``{category:
    {value, scheme, meaning}, type: {...}, modifier: {...} (optional)}``; it wins over the
    shipped table so a site can code its own classes (or correct ours) without a release.
    """
    label = str(name)
    override = (overrides or {}).get(label)
    if override is not None:
        if hasattr(override, "model_dump"):
            override = override.model_dump()
        if not isinstance(override, Mapping):
            raise TypeError(
                f"classes_coding.{label}: expected a mapping with category and type, got {type(override).__name__}"
            )
        modifier = override.get("modifier")
        return SegmentCoding(
            label=label,
            category=code_from_mapping(override.get("category"), f"classes_coding.{label}.category"),
            type=code_from_mapping(override.get("type"), f"classes_coding.{label}.type"),
            modifier=code_from_mapping(modifier, f"classes_coding.{label}.modifier") if modifier else None,
        )
    from pydicom.sr.codedict import codes

    matched = _match(label)
    if matched is None:
        return SegmentCoding(label=label, category=codes.SCT.Tissue, type=codes.SCT.Tissue, known=False)
    (category, type_code), side = matched
    return SegmentCoding(
        label=label, category=category, type=type_code, modifier=getattr(codes.SCT, side) if side else None
    )
