"""De-identification of DICOM headers before anything reaches a site's cache.

:func:`deidentify` applies the DICOM PS3.15 Annex E *Basic Application Level
Confidentiality Profile* to a header (a :class:`pydicom.Dataset`, read without pixels):

* every attribute of :data:`BASIC_PROFILE` is removed (``X``), emptied (``Z``),
  replaced by a dummy value of its VR (``D``) or, for UIDs, remapped (``U``);
* every private tag is removed, and so are the curve (50xx) and overlay (60xx) groups
  (overlays may carry burned-in text);
* every other UID that is not a well-known DICOM UID (SOP classes, transfer syntaxes)
  is remapped too;
* sequences are processed recursively.

UIDs are remapped consistently with a per-site secret: ``2.25.<int>`` where ``<int>`` is
the first 128 bits of ``HMAC-SHA256(secret, uid)`` (PS3.5 B.2 UUID-derived form), so the
same UID always maps to the same new UID at one site and cannot be reversed without the
secret.  The same secret keys the hashed file ids (:func:`secret_id`).

With ``retain_patient_characteristics`` (the profile's *Retain Patient Characteristics
Option*), Patient's Sex and Patient's Age are kept, for subgroup metrics; the prepare
step then records only the sex and a ten-year age band.

The site secret lives in the cache folder (``site-secret``, created with 0600
permissions when absent, see :func:`load_site_secret`) or is given explicitly.  Losing
it only means the hashed ids and remapped UIDs change on the next preparation.

The prepare step records only :func:`describe` of the de-identified header: modality,
manufacturer, model, photometric interpretation, bits stored, size, pixel spacing,
frames, transfer syntax and (optionally) sex and age band.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BASIC_PROFILE",
    "RETAINED_PATIENT_CHARACTERISTICS",
    "SECRET_FILE",
    "age_band",
    "deidentify",
    "describe",
    "load_site_secret",
    "remap_uid",
    "secret_id",
]

logger = logging.getLogger(__name__)

SECRET_FILE = "site-secret"

#: Annex E Table E.1-1, Basic Profile column (the common attributes): keyword -> action.
#: ``X`` remove, ``Z`` zero-length value, ``D`` dummy value, ``U`` remap the UID.  Where
#: the profile allows several actions (``X/Z``, ``X/Z/D``), the first is used.
BASIC_PROFILE: dict[str, str] = {
    # patient
    "PatientName": "Z", "PatientID": "Z", "PatientBirthDate": "Z", "PatientSex": "Z",
    "PatientAge": "X", "PatientBirthTime": "X", "PatientBirthName": "X",
    "PatientMotherBirthName": "X", "PatientAddress": "X", "PatientTelephoneNumbers": "X",
    "PatientComments": "X", "PatientSize": "X", "PatientWeight": "X",
    "PatientReligiousPreference": "X", "PatientInsurancePlanCodeSequence": "X",
    "PatientState": "X", "PatientSexNeutered": "X", "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X", "OtherPatientNames": "X", "IssuerOfPatientID": "X",
    "MedicalRecordLocator": "X", "MedicalAlerts": "X", "Allergies": "X",
    "EthnicGroup": "X", "Occupation": "X", "SmokingStatus": "X", "PregnancyStatus": "X",
    "AdditionalPatientHistory": "X", "SpecialNeeds": "X", "MilitaryRank": "X",
    "BranchOfService": "X", "CountryOfResidence": "X", "RegionOfResidence": "X",
    "InsurancePlanIdentification": "X", "ReferencedPatientSequence": "X",
    "ResponsiblePerson": "X", "ResponsibleOrganization": "X",
    # visit / admission
    "AdmissionID": "X", "AdmittingDate": "X", "AdmittingTime": "X",
    "AdmittingDiagnosesDescription": "X", "CurrentPatientLocation": "X",
    "DischargeDiagnosisDescription": "X", "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X",
    # study / series / procedure
    "AccessionNumber": "Z", "StudyID": "Z", "StudyDate": "Z", "StudyTime": "Z",
    "StudyDescription": "X", "StudyComments": "X", "SeriesDate": "X", "SeriesTime": "X",
    "SeriesDescription": "X", "AcquisitionDate": "X", "AcquisitionTime": "X",
    "AcquisitionDateTime": "X", "ContentDate": "Z", "ContentTime": "Z",
    "InstanceCreationDate": "X", "InstanceCreationTime": "X", "OverlayDate": "X",
    "OverlayTime": "X", "CurveDate": "X", "CurveTime": "X", "ProtocolName": "X",
    "AcquisitionComments": "X", "AcquisitionContextSequence": "X",
    "AcquisitionDeviceProcessingDescription": "X", "ImageComments": "X",
    "DerivationDescription": "X", "ContributionDescription": "X",
    "PerformedProcedureStepDescription": "X", "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X", "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X", "PerformedProcedureStepEndTime": "X",
    "CommentsOnThePerformedProcedureStep": "X", "PerformedLocation": "X",
    "RequestAttributesSequence": "X", "RequestedProcedureDescription": "X",
    "RequestedProcedureID": "X", "RequestingPhysician": "X", "RequestingService": "X",
    "ScheduledProcedureStepDescription": "X", "ScheduledProcedureStepID": "X",
    "ReasonForTheRequestedProcedure": "X", "ResultsID": "X", "ResultsIDIssuer": "X",
    "ReferencedStudySequence": "X", "ReferencedPerformedProcedureStepSequence": "X",
    "ReferencedImageSequence": "X", "SourceImageSequence": "X",
    "ModifiedAttributesSequence": "X", "OriginalAttributesSequence": "X",
    "ContentSequence": "X", "TextComments": "X", "TextString": "X", "Arbitrary": "X",
    "TimezoneOffsetFromUTC": "X", "DigitalSignaturesSequence": "X",
    "IconImageSequence": "X", "FrameComments": "X", "ImagePresentationComments": "X",
    # people
    "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X", "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X", "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X", "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X", "OperatorsName": "X",
    "OperatorIdentificationSequence": "X", "PersonName": "X", "ContentCreatorName": "Z",
    "VerifyingObserverName": "D", "VerifyingOrganization": "X",
    "ActualHumanPerformersSequence": "X", "AuthorObserverSequence": "X",
    # institution and devices
    "InstitutionName": "X", "InstitutionAddress": "X", "InstitutionalDepartmentName": "X",
    "InstitutionCodeSequence": "X", "StationName": "X", "DeviceSerialNumber": "X",
    "DetectorID": "X", "PlateID": "X", "CassetteID": "X", "GantryID": "X",
    "SourceSerialNumber": "X",
    # UIDs
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U",
    "MediaStorageSOPInstanceUID": "U", "FrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U", "ReferencedSOPInstanceUID": "U",
    "ReferencedFrameOfReferenceUID": "U", "RelatedFrameOfReferenceUID": "U",
    "InstanceCreatorUID": "U", "DeviceUID": "U", "IrradiationEventUID": "U",
    "ConcatenationUID": "U", "DimensionOrganizationUID": "U",
    "StorageMediaFileSetUID": "U", "TransactionUID": "U", "FiducialUID": "U", "UID": "U",
}

#: Kept under the Retain Patient Characteristics Option (subgroup metrics).
RETAINED_PATIENT_CHARACTERISTICS: frozenset[str] = frozenset({"PatientSex", "PatientAge"})

_DUMMY_BY_VR: dict[str, Any] = {
    "PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
    "AS": "000Y", "IS": "0", "DS": "0", "CS": "ANONYMIZED", "SH": "ANONYMIZED",
    "LO": "ANONYMIZED", "ST": "ANONYMIZED", "LT": "ANONYMIZED", "UT": "ANONYMIZED",
    "UC": "ANONYMIZED", "AE": "ANONYMIZED",
}


def secret_id(value: str, secret: bytes, *, length: int = 12) -> str:
    """Short keyed hash of ``value`` (a file path, a UID) with the site secret."""
    return hmac.new(secret, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def remap_uid(uid: str, secret: bytes) -> str:
    """Map ``uid`` to ``2.25.<int>`` (the first 128 bits of HMAC-SHA256(secret, uid))."""
    digest = hmac.new(secret, str(uid).strip().encode("ascii", "replace"),
                      hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def load_site_secret(cache_dir: str | os.PathLike[str] | None,
                     secret: str | bytes | None = None) -> bytes:
    """Return the site secret: ``secret`` if given, else ``<cache_dir>/site-secret``.

    The file is created with 0600 permissions (64 random hex digits) when absent.  It
    never leaves the site; keep it with the cache so hashed ids stay stable across runs.

    Raises
    ------
    ValueError
        If neither a secret nor a folder is given, or the secret file is empty.
    """
    if secret is not None:
        value = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not value:
            raise ValueError("the site secret is empty; give a non-empty secret")
        return value
    if cache_dir is None:
        raise ValueError("give a site secret or a cache folder to keep it in")
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o077
        if mode:
            logger.warning("the site secret file can be read by other users; restrict it "
                           "with chmod 600")
        value = path.read_bytes().strip()
        if not value:
            raise ValueError(f"the site secret file {path} is empty; delete it to make a "
                             "new one (hashed ids will change)") from None
        return value
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path.read_bytes().strip()


def _is_standard_uid(value: str) -> bool:
    from pydicom.uid import UID_dictionary

    return value in UID_dictionary


def _dummy(elem: Any) -> Any:
    if elem.VR == "SQ":
        return []
    return _DUMMY_BY_VR.get(elem.VR, None)


def _apply(ds: Any, secret: bytes, profile: Mapping[Any, str]) -> None:
    """Apply ``profile`` (tag -> action) to ``ds`` in place, recursing into sequences.

    Elements are converted from their raw form only when their value is needed (UIDs,
    sequences, replaced values): converting every element costs more than the rest.
    """
    for tag in list(ds.keys()):
        if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000):
            del ds[tag]
            continue
        action = profile.get(tag)
        if action == "X":
            del ds[tag]
            continue
        vr = ds.get_item(tag).VR
        if action is None and vr not in ("UI", "SQ", None):
            continue
        elem = ds[tag]  # converted
        if action == "Z":
            elem.value = [] if elem.VR == "SQ" else None
        elif action == "D":
            elem.value = _dummy(elem)
        elif elem.VR == "UI" and elem.value:
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            mapped = [str(v) if action != "U" and _is_standard_uid(str(v))
                      else remap_uid(str(v), secret) for v in values]
            elem.value = mapped if elem.VM > 1 else mapped[0]
        elif elem.VR == "SQ":
            for item in elem.value or []:
                _apply(item, secret, profile)


@functools.lru_cache(maxsize=2)
def _tag_profile(retain_patient_characteristics: bool) -> dict[Any, str]:
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    table: dict[Any, str] = {}
    for keyword, action in BASIC_PROFILE.items():
        if retain_patient_characteristics and keyword in RETAINED_PATIENT_CHARACTERISTICS:
            continue
        tag = tag_for_keyword(keyword)
        if tag is not None:
            table[Tag(tag)] = action
    return table


def deidentify(ds: Any, secret: bytes, *, retain_patient_characteristics: bool = False
               ) -> Any:
    """Apply the Basic Application Level Confidentiality Profile to ``ds`` in place.

    Parameters
    ----------
    ds:
        A :class:`pydicom.Dataset` (its ``file_meta`` is processed too).
    secret:
        The site secret that keys the UID remapping.
    retain_patient_characteristics:
        Keep Patient's Sex and Age (Retain Patient Characteristics Option).

    Returns
    -------
    The same dataset, de-identified; ``PatientIdentityRemoved`` is set to ``YES`` and
    ``DeidentificationMethod`` names the profile.
    """
    profile = _tag_profile(retain_patient_characteristics)
    _apply(ds, secret, profile)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        _apply(file_meta, secret, profile)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ("PS3.15 Annex E Basic Profile"
                                 + (", Retain Patient Chars" if retain_patient_characteristics
                                    else ""))
    return ds


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")


def age_band(age: str | None) -> str | None:
    """Ten-year band (``"40-49"``, ``"90+"``) of a DICOM Age String (``"045Y"``)."""
    if not age:
        return None
    match = _AGE.match(str(age).upper())
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    years = number if unit == "Y" else number // {"M": 12, "W": 52, "D": 365}[unit]
    if years >= 90:
        return "90+"
    low = (years // 10) * 10
    return f"{low}-{low + 9}"


def _str_or_none(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def _int_or_none(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword, None)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def describe(ds: Any, *, subgroups: bool = False) -> dict[str, Any]:
    """The fields the cache manifest and the readiness report keep (None when absent).

    ``ds`` must already be de-identified.  ``sex`` and ``age_band`` are included only
    with ``subgroups`` (and need ``retain_patient_characteristics`` in
    :func:`deidentify`).
    """
    spacing = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword, None)
        try:
            if value:
                spacing = float(value[0])
                break
        except (TypeError, ValueError, IndexError):
            spacing = None
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID", None) if file_meta is not None else None
    photometric = _str_or_none(ds, "PhotometricInterpretation")
    fields: dict[str, Any] = {
        "modality": _str_or_none(ds, "Modality"),
        "manufacturer": _str_or_none(ds, "Manufacturer"),
        "model": _str_or_none(ds, "ManufacturerModelName"),
        "photometric": photometric.upper() if photometric else None,
        "bits_stored": _int_or_none(ds, "BitsStored"),
        "rows": _int_or_none(ds, "Rows"),
        "cols": _int_or_none(ds, "Columns"),
        "pixel_spacing": spacing,
        "frames": _int_or_none(ds, "NumberOfFrames") or 1,
        "transfer_syntax": (syntax.name if syntax else None),
    }
    if subgroups:
        sex = (_str_or_none(ds, "PatientSex") or "").upper()
        fields["sex"] = sex if sex in ("M", "F", "O") else None
        fields["age_band"] = age_band(_str_or_none(ds, "PatientAge"))
    return fields
