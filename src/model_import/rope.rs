//! Rotary embedding frequencies, computed in float32 as transformers' `ROPE_INIT_FUNCTIONS` do:
//! `inv_freq[i] = 1 / theta^(2i / dim)`, then rescaled by the config's `rope_scaling`.

use super::config::RopeScaling;

/// `inv_freq` of length `dim / 2`.
pub fn inv_freq(dim: i64, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base = theta as f32;
    let plain: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect();
    match *scaling {
        // dynamic NTK scaling changes the frequencies only for sequences longer than max_position_embeddings
        RopeScaling::Default | RopeScaling::Dynamic { .. } => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_linear() {
        let f = inv_freq(4, 10000.0, &RopeScaling::Default);
        assert_eq!(f, vec![1.0, 0.01]);
        assert_eq!(inv_freq(4, 10000.0, &RopeScaling::Linear { factor: 4.0 }), vec![0.25, 0.0025]);
    }

    /// Llama 3's rule keeps short wavelengths, divides long ones by the factor and blends between.
    #[test]
    fn llama3_scales_only_long_wavelengths() {
        let scaling = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64.0 };
        let plain = inv_freq(64, 500000.0, &RopeScaling::Default);
        let scaled = inv_freq(64, 500000.0, &scaling);
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 16.0 {
                assert_eq!(s, p);
            } else if wavelen > 64.0 {
                assert_eq!(*s, p / 8.0);
            } else {
                assert!(*s < *p && *s > p / 8.0, "{s} between {p} and {}", p / 8.0);
            }
        }
    }
}
