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
