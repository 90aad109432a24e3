//! The data-parallel side of the loop (see [`crate::distributed`]): one fused gradient allreduce
//! per step, and the per-pair values and tallies behind the metrics exchanged so that rank 0
//! writes what one process would.
//!
//! A rank's gradient is the mean over its share of a micro-batch's pairs, as the DPO loss is a
//! mean over pairs; weighted by that share (`pairs / batch_pairs`) and summed over the ranks it is
//! the mean over the whole micro-batch, also when the shares are unequal. Micro-batches are then
//! summed as in one process (the optimizer's `gradient_scale` divides by `grad_accum`).

use std::time::Instant;

use ort::value::Tensor;

use super::gradient_reduce::GradientReduce;
use crate::distributed::wire::{Reader, Writer};
use crate::distributed::Collective;
use crate::train::device::Device;
use crate::train::metrics::PairValues;
use crate::{Error, Result};

/// All of a step's gradients as one flat host buffer, so one MPI allreduce moves them.
pub struct HostGradientSum {
    flat: Vec<f32>,
    /// Each parameter's shape and start in `flat`.
    shapes: Vec<Vec<usize>>,
    offsets: Vec<usize>,
    /// The last micro-batch's gradient tensors, on the CPU: the sums are written back into them.
    reuse: Option<Vec<Tensor<f32>>>,
}

impl HostGradientSum {
    pub fn new(shapes: &[Vec<i64>]) -> Self {
        let shapes: Vec<Vec<usize>> = shapes.iter().map(|s| s.iter().map(|&d| d as usize).collect()).collect();
        let mut offsets = Vec::with_capacity(shapes.len());
        let mut total = 0;
        for s in &shapes {
            offsets.push(total);
            total += s.iter().product::<usize>();
        }
        HostGradientSum { flat: vec![0.0; total], shapes, offsets, reuse: None }
    }
}

impl GradientReduce for HostGradientSum {
    fn clear(&mut self) {
        self.flat.fill(0.0);
    }

    fn add(&mut self, grads: Vec<Tensor<f32>>, weight: f32, device: &Device) -> Result<()> {
        for (k, g) in grads.iter().enumerate() {
            let downloaded;
            let data: &[f32] = if device.is_gpu() {
                downloaded = device.download(g)?.1;
                &downloaded
            } else {
                g.try_extract_tensor::<f32>()?.1
            };
            for (acc, &x) in self.flat[self.offsets[k]..self.offsets[k] + data.len()].iter_mut().zip(data) {
                *acc += weight * x;
            }
        }
        self.reuse = (!device.is_gpu()).then_some(grads);
        Ok(())
    }

    fn allreduce(&mut self, coll: &dyn Collective) -> Result<f64> {
        let started = Instant::now();
        coll.sum_f32(&mut self.flat)?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Written into the last micro-batch's gradient tensors on the CPU, else uploaded afresh.
    fn take(&mut self, device: &Device) -> Result<Vec<Tensor<f32>>> {
        match self.reuse.take() {
            Some(mut grads) if !device.is_gpu() => {
                for (k, g) in grads.iter_mut().enumerate() {
                    let (_, data) = g.try_extract_tensor_mut::<f32>()?;
                    data.copy_from_slice(&self.flat[self.offsets[k]..self.offsets[k] + data.len()]);
                }
                Ok(grads)
            }
            _ => self.shapes.iter().zip(&self.offsets).map(|(s, &o)| device.upload(s, self.flat[o..o + s.iter().product::<usize>()].to_vec())).collect(),
        }
    }
}

/// Every rank's per-pair values of each micro-batch, joined micro-batch by micro-batch in rank
/// order: the values of the whole batches (in one process's order for padded batches; packed
/// shares are rows, whose pairs come in another order, which only the last bits of means notice).
pub fn gather_pairs(coll: &dyn Collective, micro: &[PairValues]) -> Result<PairValues> {
    let mut w = Writer::default();
    w.u64(micro.len() as u64);
    for v in micro {
        v.write(&mut w);
    }
    let per_rank = coll.gather(&w.bytes)?;
    let mut readers: Vec<Reader> = per_rank.iter().map(|b| Reader::new(b)).collect();
    let counts = readers.iter_mut().map(|r| r.u64()).collect::<Result<Vec<_>>>()?;
    if counts.iter().any(|&n| n != micro.len() as u64) {
        return Err(Error::Distributed(format!("the ranks ran different numbers of micro-batches: {counts:?}")));
    }
    let mut all = PairValues::default();
    for _ in micro {
        for r in &mut readers {
            all.extend(PairValues::read(r)?);
        }
    }
    Ok(all)
}
