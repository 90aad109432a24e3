//! Moving training state between host tensors (files) and runtime values (the device).

use std::borrow::Cow;
use std::collections::HashMap;

use ort::value::Tensor;

use crate::dpo::Manifest;
use crate::store::{NamedTensor, RawTensor};
use crate::train::device::Device;
use crate::train::session_io::Feeds;
use crate::{Error, Result};

/// Moves the host tensors named `wanted` out of `by_name` into runtime values, in that order (no
/// copy on the CPU); `missing` words the error for a name that is not there.
pub fn take_uploaded(
    by_name: &mut HashMap<String, NamedTensor>,
    wanted: &[String],
    device: &Device,
    missing: impl Fn(&str) -> String,
) -> Result<Vec<Tensor<f32>>> {
    wanted
        .iter()
        .map(|n| {
            let t = by_name.remove(n).ok_or_else(|| Error::ParameterMismatch(missing(n)))?;
            device.upload(&t.shape, t.data)
        })
        .collect()
}

pub fn by_name(tensors: Vec<NamedTensor>) -> HashMap<String, NamedTensor> {
    tensors.into_iter().map(|t| (t.name.clone(), t)).collect()
}

/// The trainable parameters among `tensors`, in the manifest's order, as runtime values.
pub fn to_feeds(tensors: Vec<NamedTensor>, m: &Manifest, device: &Device) -> Result<Feeds> {
    let names: Vec<String> = m.trainable().map(|p| p.name.clone()).collect();
    let values = take_uploaded(&mut by_name(tensors), &names, device, |n| format!("parameter {n} is missing"))?;
    Ok(Feeds { names, values })
}

/// Host-side views of training state for writing files: the tensors' own memory on the CPU
/// (a checkpoint of a large model costs no extra memory), downloaded copies on a GPU.
pub struct HostViews<'a> {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    data: Vec<Cow<'a, [f32]>>,
}

impl<'a> HostViews<'a> {
    pub fn of(names: &[String], values: &'a [Tensor<f32>], suffix: &str, device: &Device) -> Result<Self> {
        let mut views = HostViews { names: Vec::new(), shapes: Vec::new(), data: Vec::new() };
        for (n, v) in names.iter().zip(values) {
            let (shape, data) = if device.is_gpu() {
                let (shape, data) = device.download(v)?;
                (shape, Cow::Owned(data))
            } else {
                let (shape, data) = v.try_extract_tensor::<f32>()?;
                (shape.iter().map(|&d| d as usize).collect(), Cow::Borrowed(data))
            };
            views.names.push(format!("{n}{suffix}"));
            views.shapes.push(shape);
            views.data.push(data);
        }
        Ok(views)
    }

    pub fn raw(&self) -> Vec<RawTensor<'_>> {
        self.names.iter().zip(&self.shapes).zip(&self.data).map(|((n, s), d)| RawTensor::of_f32(n, s.clone(), d)).collect()
    }
}
