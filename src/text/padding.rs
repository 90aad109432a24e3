//! Right padding: token rows of different lengths as one `[rows, width]` batch.

use ndarray::Array2;

/// Token rows as a model's inputs, right-padded: ids, attention mask, positions `0..width` on every row.
pub struct RightPadded {
    pub ids: Array2<i64>,
    pub mask: Array2<i64>,
    pub positions: Array2<i64>,
}

impl RightPadded {
    /// Padded to the longest row (at least one column).
    pub fn of(rows: &[Vec<u32>], pad_id: i64) -> Self {
        let width = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
        Self::to_width(rows.iter().map(|r| r.iter().copied()), rows.len(), width, pad_id)
    }

    /// `count` rows padded to `width`, which must be at least the longest row.
    pub fn to_width<R: Iterator<Item = u32>>(rows: impl Iterator<Item = R>, count: usize, width: usize, pad_id: i64) -> Self {
        let mut ids = Array2::from_elem((count, width), pad_id);
        let mut mask = Array2::zeros((count, width));
        for (r, row) in rows.enumerate() {
            for (c, tok) in row.enumerate() {
                ids[[r, c]] = tok as i64;
                mask[[r, c]] = 1;
            }
        }
        let positions = Array2::from_shape_fn((count, width), |(_, c)| c as i64);
        RightPadded { ids, mask, positions }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_padded_on_the_right_with_a_mask_of_their_tokens() {
        let p = RightPadded::of(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!(p.ids, ndarray::arr2(&[[5, 6, 7], [8, 0, 0]]));
        assert_eq!(p.mask, ndarray::arr2(&[[1, 1, 1], [1, 0, 0]]));
        assert_eq!(p.positions, ndarray::arr2(&[[0, 1, 2], [0, 1, 2]]));
        assert_eq!(RightPadded::of(&[], 3).ids.dim(), (0, 1));
    }
}
