//! Token embedding lookup: rows of a [vocab, d] table gathered by token id.
//! It has no input gradient (ids are integers); the weight gradient scatters rows back.

/// out[n,d] = table[ids[n], :]
pub fn forward(out: &mut [f32], ids: &[u32], table: &[f32], d: usize) {
    for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * d..(id + 1) * d]);
    }
}

/// dtable[ids[n], :] += dout[n, :], in token order (deterministic).
pub fn backward_weight(dtable: &mut [f32], ids: &[u32], dout: &[f32], d: usize) {
    for (row, &id) in dout.chunks_exact(d).zip(ids) {
        let id = id as usize;
        for (g, v) in dtable[id * d..(id + 1) * d].iter_mut().zip(row) {
            *g += v;
        }
    }
}

/// The rows of `ids` grouped by id, for a weight gradient summed per table row instead of
/// scattered: `order` holds the row numbers sorted by id, rows of one id ascending (the order
/// [`backward_weight`] adds them in); segment `s` is `order[starts[s]..starts[s + 1]]`, the
/// rows of id `seg_ids[s]`, ids ascending.
pub fn rows_by_id(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&r| ids[r as usize]); // stable: rows of one id stay ascending
    let (mut starts, mut seg_ids) = (Vec::new(), Vec::new());
    for (i, &r) in order.iter().enumerate() {
        let id = ids[r as usize];
        if seg_ids.last() != Some(&id) {
            starts.push(i as u32);
            seg_ids.push(id);
        }
    }
    starts.push(order.len() as u32);
    (order, starts, seg_ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_by_id_keeps_each_ids_rows_in_order() {
        let ids = [3, 1, 3, 0, 1, 3];
        let (order, starts, seg_ids) = rows_by_id(&ids);
        assert_eq!(order, [3, 1, 4, 0, 2, 5]);
        assert_eq!(starts, [0, 1, 3, 6]);
        assert_eq!(seg_ids, [0, 1, 3]);
        // summing each segment's rows in order is the scatter-add's arithmetic, bit for bit
        let d = 2;
        let dout: Vec<f32> = (0..ids.len() * d).map(|i| 0.1 + i as f32 * 1e-3).collect();
        let mut want = vec![0.5f32; 4 * d];
        backward_weight(&mut want, &ids, &dout, d);
        let mut got = vec![0.5f32; 4 * d];
        for s in 0..seg_ids.len() {
            for j in 0..d {
                let at = seg_ids[s] as usize * d + j;
                for &r in &order[starts[s] as usize..starts[s + 1] as usize] {
                    got[at] += dout[r as usize * d + j];
                }
            }
        }
        assert_eq!(got, want);
        assert_eq!(rows_by_id(&[]), (vec![], vec![0], vec![]));
    }
}
