//! Central-difference gradient checking of single-op graphs through ONNX Runtime.
//!
//! A case is one op with its inputs. The checker builds `L = sum_k sum(Y_k * R_k)` with fixed
//! random `R_k`, differentiates it with betadpo's autodiff, runs the gradient graph in ONNX Runtime,
//! and compares every element of every active input's gradient with
//! `(L(x + eps e_i) - L(x - eps e_i)) / 2 eps`, also computed by ONNX Runtime. Cases run in float64
//! when the runtime has float64 kernels for the op (tight tolerances), else in float32.

#![allow(dead_code)]

use betadpo::autodiff::differentiate;
use betadpo::graph::{probe_shapes, Graph, ProbeBatch};
use betadpo::onnx::{dtype, proto, value_info, AttributeProto, Dim, NodeProto, OperatorSetIdProto};
use betadpo::runtime::{run, HostTensor, OptLevel, SessionConfig};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};

/// One input of the op under test.
#[derive(Clone, Debug)]
pub enum In {
    /// A float input the gradient is checked for; values random in [-1, 1] (or [lo, hi]).
    Float(Vec<usize>),
    FloatRange(Vec<usize>, f64, f64),
    /// A float input that is not differentiated (given values).
    FloatConst(Vec<usize>, Vec<f64>),
    /// An int64 initializer (axes, shapes, indices).
    Ints(Vec<usize>, Vec<i64>),
    /// An int64 graph input, fed at run time (bounds no rule can read as constants).
    IntsFed(Vec<usize>, Vec<i64>),
    /// A bool graph input.
    Bool(Vec<usize>, Vec<bool>),
    /// An absent optional input.
    Absent,
}

pub struct Case {
    pub op: &'static str,
    pub inputs: Vec<In>,
    pub attrs: Vec<AttributeProto>,
    pub outputs: usize,
    pub opset: i64,
    /// Shapes of the float/bool inputs for the second shape probe, to exercise dynamic dimensions
    /// (same as the first when `None`).
    pub alt_shapes: Option<Vec<Vec<usize>>>,
}

impl Case {
    pub fn new(op: &'static str, inputs: Vec<In>) -> Self {
        Case { op, inputs, attrs: vec![], outputs: 1, opset: 18, alt_shapes: None }
    }
    pub fn attrs(mut self, a: Vec<AttributeProto>) -> Self {
        self.attrs = a;
        self
    }
    pub fn outputs(mut self, n: usize) -> Self {
        self.outputs = n;
        self
    }
    pub fn opset(mut self, v: i64) -> Self {
        self.opset = v;
        self
    }
    pub fn dynamic(mut self, alt: Vec<Vec<usize>>) -> Self {
        self.alt_shapes = Some(alt);
        self
    }
}

fn elem(t: i32) -> i32 {
    t
}

fn random_values(rng: &mut impl Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn host_float(shape: &[usize], v: &[f64], t: i32) -> HostTensor {
    if t == dtype::DOUBLE {
        HostTensor::F64(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
    } else {
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v.iter().map(|&x| x as f32).collect()).unwrap())
    }
}

fn out_type(t: &HostTensor) -> i32 {
    match t {
        HostTensor::F64(_) => dtype::DOUBLE,
        _ => dtype::FLOAT,
    }
}

fn to_f64(t: &HostTensor) -> Vec<f64> {
    match t {
        HostTensor::F64(a) => a.iter().copied().collect(),
        HostTensor::F32(a) => a.iter().map(|&x| x as f64).collect(),
        other => panic!("expected a float output, got {other:?}"),
    }
}

struct Built {
    graph: Graph,
    feeds: Vec<(String, HostTensor)>,
    /// (input name, shape, values) of the checked inputs
    active: Vec<(String, Vec<usize>, Vec<f64>)>,
}

fn base_graph(case: &Case, t: i32, seed: u64) -> Built {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut g = Graph { opsets: vec![OperatorSetIdProto { domain: String::new(), version: case.opset }], ir_version: 8, ..Default::default() };
    let mut node = NodeProto { op_type: case.op.into(), name: "op_under_test".into(), attribute: case.attrs.clone(), ..Default::default() };
    let mut feeds = Vec::new();
    let mut active = Vec::new();
    for (k, input) in case.inputs.iter().enumerate() {
        let name = format!("x{k}");
        let dyn_dims = |shape: &[usize]| -> Vec<Dim> { shape.iter().enumerate().map(|(j, _)| Dim::Sym(format!("x{k}_d{j}"))).collect() };
        match input {
            In::Float(shape) | In::FloatRange(shape, ..) => {
                let (lo, hi) = match input {
                    In::FloatRange(_, lo, hi) => (*lo, *hi),
                    _ => (-1.0, 1.0),
                };
                let n = shape.iter().product();
                let v = random_values(&mut rng, n, lo, hi);
                g.inputs.push(value_info(&name, elem(t), &dyn_dims(shape)));
                feeds.push((name.clone(), host_float(shape, &v, t)));
                active.push((name.clone(), shape.clone(), v));
            }
            In::FloatConst(shape, v) => {
                g.inputs.push(value_info(&name, elem(t), &dyn_dims(shape)));
                feeds.push((name.clone(), host_float(shape, v, t)));
            }
            In::Ints(shape, v) => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                g.initializers.push(betadpo::onnx::tensor_i64(&name, &dims, v));
            }
            In::IntsFed(shape, v) => {
                g.inputs.push(value_info(&name, dtype::INT64, &dyn_dims(shape)));
                feeds.push((name.clone(), HostTensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v.clone()).unwrap())));
            }
            In::Bool(shape, v) => {
                g.inputs.push(value_info(&name, dtype::BOOL, &dyn_dims(shape)));
                feeds.push((name.clone(), HostTensor::Bool(ArrayD::from_shape_vec(IxDyn(shape), v.clone()).unwrap())));
            }
            In::Absent => {
                node.input.push(String::new());
                continue;
            }
        }
        node.input.push(name);
    }
    node.output = (0..case.outputs).map(|k| format!("y{k}")).collect();
    g.nodes.push(node);
    g.outputs = (0..case.outputs).map(|k| value_info(&format!("y{k}"), elem(t), &[])).collect();
    for o in g.outputs.iter_mut() {
        o.r#type = None;
    }
    g.names = betadpo::graph::Names::from_graph(&g);
    Built { graph: g, feeds, active }
}

fn session(g: &Graph) -> betadpo::Result<ort::session::Session> {
    let model: proto::ModelProto = g.clone().into_model();
    let bytes = prost::Message::encode_to_vec(&model);
    SessionConfig { optimization: OptLevel::Disable, intra_threads: Some(1), ..Default::default() }.session_from_bytes(&bytes)
}

fn feeds_ref(f: &[(String, HostTensor)]) -> Vec<(&str, HostTensor)> {
    f.iter().map(|(n, t)| (n.as_str(), t.clone())).collect()
}

/// Runs the check; returns the element type used. Panics with details on a mismatch.
pub fn check(case: &Case) -> i32 {
    for t in [dtype::DOUBLE, dtype::FLOAT] {
        match try_check(case, t) {
            Ok(()) => return t,
            Err(e) if t == dtype::DOUBLE && e.contains("NOT_IMPLEMENTED") => continue,
            Err(e) if t == dtype::DOUBLE && e.contains("Could not find an implementation") => continue,
            Err(e) => panic!("{} ({}): {e}", case.op, dtype::name(t)),
        }
    }
    unreachable!()
}

fn try_check(case: &Case, t: i32) -> Result<(), String> {
    let built = base_graph(case, t, 7);
    // Output shapes, to make the random projection R.
    let mut fwd = session(&built.graph).map_err(|e| e.to_string())?;
    let outs = run(&mut fwd, &feeds_ref(&built.feeds)).map_err(|e| e.to_string())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut g = built.graph.clone();
    let mut feeds = built.feeds.clone();
    let mut terms = Vec::new();
    let mut b = betadpo::graph::Builder::new(&mut g.names, "loss/");
    for (k, (_, y)) in outs.iter().enumerate() {
        let shape = y.shape();
        let r = random_values(&mut rng, shape.iter().product(), -1.0, 1.0);
        let rname = format!("r{k}");
        feeds.push((rname.clone(), host_float(shape, &r, out_type(y))));
        let prod = b.op("Mul", &[&format!("y{k}"), &rname], vec![], "prod");
        terms.push(b.op("ReduceSum", &[&prod], vec![betadpo::onnx::attr_i("keepdims", 0)], "term"));
    }
    let refs: Vec<&str> = terms.iter().map(String::as_str).collect();
    b.op_into("Sum", &refs, &["loss"], vec![]);
    let nodes = b.take();
    g.nodes.extend(nodes);
    for (k, (_, out)) in outs.iter().enumerate() {
        let shape: Vec<Dim> = out.shape().iter().enumerate().map(|(j, _)| Dim::Sym(format!("r{k}_d{j}"))).collect();
        g.inputs.push(value_info(&format!("r{k}"), out_type(out), &shape));
    }
    g.outputs = vec![value_info("loss", elem(t), &[])];
    g.outputs[0].r#type = None;

    // Probe shapes: second run with the alternative shapes when given.
    let probe_b = match &case.alt_shapes {
        None => feeds.clone(),
        Some(alt) => {
            let mut c2 = Case::new(case.op, case.inputs.clone());
            let mut ai = alt.iter();
            c2.inputs = case
                .inputs
                .iter()
                .map(|i| match i {
                    In::Float(_) => In::Float(ai.next().unwrap().clone()),
                    In::FloatRange(_, lo, hi) => In::FloatRange(ai.next().unwrap().clone(), *lo, *hi),
                    In::FloatConst(_, _) => {
                        let s = ai.next().unwrap().clone();
                        let n = s.iter().product();
                        In::FloatConst(s, vec![0.5; n])
                    }
                    In::Bool(_, _) => {
                        let s = ai.next().unwrap().clone();
                        let n = s.iter().product();
                        In::Bool(s, vec![true; n])
                    }
                    other => other.clone(),
                })
                .collect();
            c2.attrs = case.attrs.clone();
            c2.outputs = case.outputs;
            c2.opset = case.opset;
            let b2 = base_graph(&c2, t, 9);
            let mut fwd2 = session(&b2.graph).map_err(|e| e.to_string())?;
            let outs2 = run(&mut fwd2, &feeds_ref(&b2.feeds)).map_err(|e| e.to_string())?;
            let mut f = b2.feeds.clone();
            for (k, (_, y)) in outs2.iter().enumerate() {
                let shape = y.shape();
                f.push((format!("r{k}"), host_float(shape, &vec![0.25; shape.iter().product()], out_type(y))));
            }
            f
        }
    };
    let infos = probe_shapes(&g, &ProbeBatch { runs: [feeds.clone(), probe_b] }).map_err(|e| e.to_string())?;
    let params: Vec<String> = built.active.iter().map(|a| a.0.clone()).collect();
    let grads = differentiate(&mut g, "loss", &params, &infos).map_err(|e| e.to_string())?;
    for (_, gname) in &grads.by_param {
        g.outputs.push(value_info(gname, elem(t), &[]));
        g.outputs.last_mut().unwrap().r#type = None;
    }
    let mut sess = session(&g).map_err(|e| e.to_string())?;
    let res = run(&mut sess, &feeds_ref(&feeds)).map_err(|e| e.to_string())?;
    let analytic: Vec<Vec<f64>> = res[1..].iter().map(|(_, v)| to_f64(v)).collect();

    let (eps, rtol, atol) = if t == dtype::DOUBLE { (1e-6, 1e-5, 1e-7) } else { (1e-2, 2e-2, 2e-3) };
    for (pi, (name, shape, values)) in built.active.iter().enumerate() {
        let grad = &analytic[pi];
        if grad.len() != values.len() {
            return Err(format!("gradient of {name} has {} elements, the input {}", grad.len(), values.len()));
        }
        let pos = feeds.iter().position(|(n, _)| n == name).unwrap();
        for i in 0..values.len() {
            let mut lv = [0.0; 2];
            for (s, sign) in [1.0, -1.0].iter().enumerate() {
                let mut v = values.clone();
                v[i] += sign * eps;
                let mut f = feeds.clone();
                f[pos].1 = host_float(shape, &v, t);
                let r = run(&mut sess, &feeds_ref(&f)).map_err(|e| e.to_string())?;
                lv[s] = to_f64(&r[0].1)[0];
            }
            let numeric = (lv[0] - lv[1]) / (2.0 * eps);
            let a = grad[i];
            if (a - numeric).abs() > atol + rtol * numeric.abs().max(a.abs()) {
                return Err(format!("d loss / d {name}[{i}]: autodiff {a:.8e}, central difference {numeric:.8e} (shape {shape:?})"));
            }
        }
    }
    Ok(())
}
