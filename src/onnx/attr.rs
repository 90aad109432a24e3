//! Reading and writing node attributes.

use super::proto::{attribute_proto::AttributeType, AttributeProto, GraphProto, NodeProto, TensorProto};

/// A value to put into an attribute (short-lived, so the large `Tensor` variant is not boxed).
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AttrValue {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(String),
    Tensor(TensorProto),
}

pub fn attr(name: &str, value: AttrValue) -> AttributeProto {
    let mut a = AttributeProto { name: name.to_string(), ..Default::default() };
    match value {
        AttrValue::Int(i) => {
            a.r#type = AttributeType::Int as i32;
            a.i = i;
        }
        AttrValue::Float(f) => {
            a.r#type = AttributeType::Float as i32;
            a.f = f;
        }
        AttrValue::Ints(v) => {
            a.r#type = AttributeType::Ints as i32;
            a.ints = v;
        }
        AttrValue::Str(s) => {
            a.r#type = AttributeType::String as i32;
            a.s = s.into_bytes().into();
        }
        AttrValue::Tensor(t) => {
            a.r#type = AttributeType::Tensor as i32;
            a.t = Some(t);
        }
    }
    a
}

pub fn attr_i(name: &str, v: i64) -> AttributeProto {
    attr(name, AttrValue::Int(v))
}
pub fn attr_f(name: &str, v: f32) -> AttributeProto {
    attr(name, AttrValue::Float(v))
}
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    attr(name, AttrValue::Ints(v.to_vec()))
}
pub fn attr_s(name: &str, v: &str) -> AttributeProto {
    attr(name, AttrValue::Str(v.to_string()))
}
pub fn attr_t(name: &str, v: TensorProto) -> AttributeProto {
    attr(name, AttrValue::Tensor(v))
}
/// A subgraph attribute (an If's branches, a Loop's body).
pub fn attr_g(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto { name: name.to_string(), r#type: AttributeType::Graph as i32, g: Some(g), ..Default::default() }
}

/// Typed attribute lookup on a node.
pub trait NodeAttrs {
    fn get_attr(&self, name: &str) -> Option<&AttributeProto>;
    fn int_attr(&self, name: &str) -> Option<i64> {
        self.get_attr(name).map(|a| a.i)
    }
    fn int_or(&self, name: &str, default: i64) -> i64 {
        self.int_attr(name).unwrap_or(default)
    }
    fn float_or(&self, name: &str, default: f32) -> f32 {
        self.get_attr(name).map(|a| a.f).unwrap_or(default)
    }
    fn ints_attr(&self, name: &str) -> Option<Vec<i64>> {
        self.get_attr(name).map(|a| a.ints.clone())
    }
    fn str_attr(&self, name: &str) -> Option<String> {
        self.get_attr(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    fn tensor_attr(&self, name: &str) -> Option<&TensorProto> {
        self.get_attr(name).and_then(|a| a.t.as_ref())
    }
}

impl NodeAttrs for NodeProto {
    fn get_attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name == name)
    }
}
