//! Phase 14: every file written into a temporary directory that is renamed into place only when
//! complete, so `--out` is either the previous complete build or the new one, never a mix.

use std::path::Path;

use crate::dpo::manifest::Manifest;
use crate::graph::Graph;
use crate::onnx::{save_models_sharing_data, MappedData};
use crate::run_layout::{HF_MAP_FILE, MANIFEST_FILE, PARAMS};
use crate::store::{write_safetensors_raw, RawTensor};
use crate::Result;

/// The graphs share one copy of the frozen weights (see `onnx::save_models_sharing_data`): the model's
/// own data file, cloned, when they are unchanged and the file system shares blocks.
pub fn write_all<const N: usize>(
    out: &Path,
    manifest: &Manifest,
    graphs: [(&str, Graph); N],
    model_data: &[MappedData],
    params: &[RawTensor],
    hf_map: Option<&str>,
) -> Result<()> {
    // claimed again before the swap: the directory may have changed during the build
    crate::temp_files::write_dir(out, Manifest::claim_out_dir, |tmp| {
        let models = graphs.into_iter().map(|(which, g)| (manifest.graphs[which].file.clone(), g.into_model())).collect();
        save_models_sharing_data(tmp, models, model_data)?;
        write_safetensors_raw(&tmp.join(PARAMS), params, None)?;
        let text = serde_json::to_string_pretty(manifest).expect("manifest serialises");
        crate::temp_files::write_atomic(&tmp.join(MANIFEST_FILE), |w| w.write_all(text.as_bytes()))?;
        if let Some(text) = hf_map {
            crate::temp_files::write_atomic(&tmp.join(HF_MAP_FILE), |w| w.write_all(text.as_bytes()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::{build_artifacts, BuildOptions};

    /// A build writes the files its manifest names; the manifest reads back equal to the one built,
    /// the parameters file holds every trainable parameter, and ONNX Runtime opens every graph.
    #[test]
    fn the_written_directory_is_what_the_manifest_describes() {
        let (_dir, model) = crate::dpo::artifacts::test_model::write();
        let out = _dir.path().join("art");
        let report = build_artifacts(&model, &out, &BuildOptions::default()).unwrap();
        let read = Manifest::load(&out).unwrap();
        assert_eq!(serde_json::to_value(&read).unwrap(), serde_json::to_value(&report.manifest).unwrap());
        let bytes = std::fs::read(out.join(PARAMS)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        let mut want: Vec<String> = read.parameters.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
        want.sort();
        assert_eq!(names, want);
        for g in read.graphs.values() {
            crate::runtime::SessionConfig::default().session_from_file(&out.join(&g.file)).unwrap();
        }
        assert!(!out.join(HF_MAP_FILE).exists(), "no map beside the model, none written");
    }
}
