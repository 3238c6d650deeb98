//! Embedding lookup and its backward.
//!
//! ```text
//! forward   y[i, :] = table[ids_i, :]               table: [V, H], ids: [N], y: [N, H]
//! backward  dtable[v, :] = Σ_{i: ids_i = v} dy[i, :]   (rows of unused ids stay 0)
//! ```

use rayon::prelude::*;

/// `y[i] = table[ids[i]]` for `table: [V, h]`. Panics if an id is out of range (callers check
/// ids against the vocabulary first and report which one).
pub(crate) fn embedding_forward(table: &[f32], h: usize, ids: &[u32]) -> Vec<f32> {
    let mut y = vec![0f32; ids.len() * h];
    y.par_chunks_mut(h.max(1))
        .zip(ids.par_iter())
        .for_each(|(row, &id)| row.copy_from_slice(&table[id as usize * h..][..h]));
    y
}

/// `dtable[ids[i]] += dy[i]` into `dtable: [V, h]` (serial: ids may repeat).
#[cfg_attr(not(test), allow(dead_code))] // for the BERT encoder (issue 14), tested here
pub(crate) fn embedding_backward(dy: &[f32], h: usize, ids: &[u32], dtable: &mut [f32]) {
    for (g, &id) in dy.chunks_exact(h.max(1)).zip(ids) {
        for (d, g) in dtable[id as usize * h..][..h].iter_mut().zip(g) {
            *d += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    /// Rows copied exactly; repeated ids accumulate; unused rows stay 0.
    #[test]
    fn forward_copies_rows_and_backward_accumulates() {
        let (v, h) = (5, 3);
        let table = values(v * h, 1);
        let ids = [4u32, 0, 4, 2];
        let y = embedding_forward(&table, h, &ids);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(&y[i * h..][..h], &table[id as usize * h..][..h]);
        }
        let dy = values(ids.len() * h, 2);
        let mut dt = vec![0f32; v * h];
        embedding_backward(&dy, h, &ids, &mut dt);
        for c in 0..h {
            assert_eq!(dt[4 * h + c], dy[c] + dy[2 * h + c]);
            assert_eq!(dt[c], dy[h + c]);
            assert_eq!(dt[2 * h + c], dy[3 * h + c]);
            assert_eq!(dt[h + c], 0.0);
            assert_eq!(dt[3 * h + c], 0.0);
        }
    }
}
