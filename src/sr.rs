//! Landmarks as a Comprehensive 3D SR (PS3.3 A.35.13) following TID 1500 "Measurement
//! Report": one Measurement Group per landmark with its tracking identifier and UID, the
//! configured Finding Site, the algorithm, and the point as an SCOORD3D POINT in patient
//! coordinates; a landmark that was not found is a group with Finding = Absent. A point
//! placed without a region of its own (from the other landmarks' layout, the aligned
//! templates or a structure's outline) carries Derivation = [`estimated_code`], so a
//! planning system can tell it apart.

use crate::derived::{self, code_item, int_el, seq, str_el, DerivedError};
use crate::results::SeriesResult;
use crate::rules::Code;
use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;

pub const COMPREHENSIVE_3D_SR: &str = "1.2.840.10008.5.1.4.1.1.88.34";
/// Series Number of scout's SR series: high, so scanners list it after the acquisitions.
const SERIES_NUMBER: i64 = 9901;

/// The Derivation of an estimated point. A local code: DICOM's own "Estimated" (DCM
/// 121427) is retired.
pub fn estimated_code() -> Code {
    Code::new("99SCOUT", "ESTIMATED", "Estimated, no region of its own")
}

fn dcm(value: &str, meaning: &str) -> Code {
    Code::new("DCM", value, meaning)
}

fn item(relationship: &str, value_type: &str, concept: Option<&Code>) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    o.put(str_el(tags::RELATIONSHIP_TYPE, VR::CS, relationship));
    o.put(str_el(tags::VALUE_TYPE, VR::CS, value_type));
    if let Some(c) = concept {
        o.put(seq(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![code_item(c)]));
    }
    o
}

fn container(
    relationship: &str,
    concept: &Code,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let mut o = item(relationship, "CONTAINER", Some(concept));
    o.put(str_el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    o.put(seq(tags::CONTENT_SEQUENCE, children));
    o
}

fn code(relationship: &str, concept: &Code, value: &Code) -> InMemDicomObject {
    let mut o = item(relationship, "CODE", Some(concept));
    o.put(seq(tags::CONCEPT_CODE_SEQUENCE, vec![code_item(value)]));
    o
}

fn text(relationship: &str, concept: &Code, value: &str) -> InMemDicomObject {
    let mut o = item(relationship, "TEXT", Some(concept));
    o.put(str_el(tags::TEXT_VALUE, VR::UT, value));
    o
}

fn uidref(relationship: &str, concept: &Code, value: &str) -> InMemDicomObject {
    let mut o = item(relationship, "UIDREF", Some(concept));
    o.put(str_el(tags::UID, VR::UI, value));
    o
}

fn sop_ref(class: &str, instance: &str) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    o.put(str_el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class));
    o.put(str_el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance));
    o
}

/// The SR's SOP Instance UID for a result (stable, see `SeriesResult::key`).
pub fn instance_uid(r: &SeriesResult) -> String {
    derived::derived_uid(&[&r.key, "sr"])
}

/// Builds the SR as Part-10 bytes; `source` is the header of one source image.
pub fn build(r: &SeriesResult, source: &InMemDicomObject) -> Result<Vec<u8>, DerivedError> {
    let mut obj = derived::new_object(source, COMPREHENSIVE_3D_SR, &instance_uid(r));
    // SR Document Series.
    obj.put(str_el(tags::MODALITY, VR::CS, "SR"));
    obj.put(str_el(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &derived::derived_uid(&[&r.key, "sr series"]),
    ));
    obj.put(int_el(tags::SERIES_NUMBER, SERIES_NUMBER));
    obj.put(str_el(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &format!("scout landmarks ({})", r.rule),
    ));
    obj.put(seq(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));
    // SR Document General.
    obj.put(int_el(tags::INSTANCE_NUMBER, 1));
    obj.put(str_el(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"));
    obj.put(str_el(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"));
    obj.put(seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    let mut evidence_series = InMemDicomObject::new_empty();
    evidence_series.put(str_el(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &r.series_instance_uid,
    ));
    let images: Vec<_> = r.stacks.iter().flat_map(|s| &s.images).collect();
    evidence_series.put(seq(
        tags::REFERENCED_SOP_SEQUENCE,
        images
            .iter()
            .map(|i| sop_ref(&i.sop_class_uid, &i.sop_instance_uid))
            .collect(),
    ));
    let mut evidence = InMemDicomObject::new_empty();
    evidence.put(str_el(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        &r.study_instance_uid,
    ));
    evidence.put(seq(tags::REFERENCED_SERIES_SEQUENCE, vec![evidence_series]));
    obj.put(seq(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence],
    ));
    let estimated = estimated_code();
    let any_estimated = r
        .landmarks
        .iter()
        .any(|l| l.found.as_ref().is_some_and(|p| p.estimated()));
    derived::local_schemes(
        &mut obj,
        r.landmarks
            .iter()
            .map(|l| &l.code)
            .chain(any_estimated.then_some(&estimated)),
    );

    // SR Document Content: the root container of TID 1500.
    let mut content = vec![
        code(
            "HAS CONCEPT MOD",
            &dcm("121049", "Language of Content Item and Descendants"),
            &Code::new("RFC5646", "en-US", "English (United States)"),
        ),
        code(
            "HAS OBS CONTEXT",
            &dcm("121005", "Observer Type"),
            &dcm("121007", "Device"),
        ),
        uidref(
            "HAS OBS CONTEXT",
            &dcm("121012", "Device Observer UID"),
            &derived::derived_uid(&["scout device", &derived::device_serial()]),
        ),
        text(
            "HAS OBS CONTEXT",
            &dcm("121013", "Device Observer Name"),
            &derived::device_serial(),
        ),
        text(
            "HAS OBS CONTEXT",
            &dcm("121014", "Device Observer Manufacturer"),
            "scout",
        ),
        code(
            "HAS CONCEPT MOD",
            &dcm("121058", "Procedure reported"),
            &Code::new("SCT", "363679005", "Imaging procedure"),
        ),
    ];
    let library_entries = images
        .iter()
        .map(|i| {
            let mut o = item("CONTAINS", "IMAGE", None);
            o.put(seq(
                tags::REFERENCED_SOP_SEQUENCE,
                vec![sop_ref(&i.sop_class_uid, &i.sop_instance_uid)],
            ));
            o
        })
        .collect();
    content.push(container(
        "CONTAINS",
        &dcm("111028", "Image Library"),
        vec![container(
            "CONTAINS",
            &dcm("126200", "Image Library Group"),
            library_entries,
        )],
    ));
    let groups = r
        .landmarks
        .iter()
        .map(|l| {
            let mut g = vec![
                text(
                    "HAS OBS CONTEXT",
                    &dcm("112039", "Tracking Identifier"),
                    &l.name,
                ),
                uidref(
                    "HAS OBS CONTEXT",
                    &dcm("112040", "Tracking Unique Identifier"),
                    &derived::derived_uid(&[&r.key, "landmark", &l.name]),
                ),
                code(
                    "HAS CONCEPT MOD",
                    &Code::new("SCT", "363698007", "Finding Site"),
                    &l.code,
                ),
                text(
                    "HAS CONCEPT MOD",
                    &dcm("111001", "Algorithm Name"),
                    &r.algorithm_name,
                ),
                text(
                    "HAS CONCEPT MOD",
                    &dcm("111003", "Algorithm Version"),
                    &r.algorithm_version,
                ),
            ];
            match &l.found {
                Some(p) => {
                    if p.estimated() {
                        g.push(code(
                            "HAS CONCEPT MOD",
                            &dcm("121401", "Derivation"),
                            &estimated,
                        ));
                    }
                    let mut s = item("CONTAINS", "SCOORD3D", Some(&dcm("111030", "Image Region")));
                    s.put(str_el(tags::GRAPHIC_TYPE, VR::CS, "POINT"));
                    let [x, y, z] = p.patient_mm.map(|v| v as f32);
                    s.put(DataElement::new(
                        tags::GRAPHIC_DATA,
                        VR::FL,
                        dicom_value!(F32, [x, y, z]),
                    ));
                    s.put(str_el(
                        tags::REFERENCED_FRAME_OF_REFERENCE_UID,
                        VR::UI,
                        &p.frame_of_reference_uid,
                    ));
                    g.push(s);
                }
                None => g.push(code(
                    "CONTAINS",
                    &dcm("121071", "Finding"),
                    &Code::new("SCT", "2667000", "Absent"),
                )),
            }
            container("CONTAINS", &dcm("125007", "Measurement Group"), g)
        })
        .collect();
    content.push(container(
        "CONTAINS",
        &dcm("126010", "Imaging Measurements"),
        groups,
    ));

    obj.put(str_el(tags::VALUE_TYPE, VR::CS, "CONTAINER"));
    obj.put(seq(
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![code_item(&dcm("126000", "Imaging Measurement Report"))],
    ));
    obj.put(str_el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    let mut template = InMemDicomObject::new_empty();
    template.put(str_el(tags::MAPPING_RESOURCE, VR::CS, "DCMR"));
    template.put(str_el(tags::TEMPLATE_IDENTIFIER, VR::CS, "1500"));
    obj.put(seq(tags::CONTENT_TEMPLATE_SEQUENCE, vec![template]));
    obj.put(seq(tags::CONTENT_SEQUENCE, content));
    derived::part10(obj, "Comprehensive 3D SR")
}
