//! Parity of the model ops' kernels against `kernels::ops`: RMSNorm (forward, backward_input
//! with and without accumulation, backward_weight), SwiGLU, RoPE with a YaRN table,
//! cross-entropy (per-row losses, their f64 sum, backward) and the embedding. Each backward
//! kernel gets the CPU's own forward outputs (rstd), so a row judges one kernel only.

use super::report::{Report, ce_case, indices, normals, scaled, shape, sprinkle};
use kernels::device::cuda::launch::{Gpu, GpuError};
use kernels::ops::rope::{RopeTable, Yarn};
use kernels::ops::{cross_entropy, embedding, rmsnorm, rope, swiglu};

type R<T> = Result<T, GpuError>;

/// Runs `f`, recording an error as a failed row.
fn guard(r: &mut Report, kernel: &str, shape: &str, f: impl FnOnce(&mut Report) -> R<()>) {
    if let Err(e) = f(r) {
        r.error(kernel, shape, &e);
    }
}

pub fn run(gpu: &Gpu, r: &mut Report, seed: u64) {
    for (rows, d, timed) in [(4096, 7168, true), (3, 1000, false), (5, 1, false)] {
        let s = shape(&[rows, d]);
        guard(r, "rmsnorm", &s, |r| {
            rmsnorm_rows(gpu, r, seed, rows, d, timed)
        });
    }
    for (n, timed) in [(4096 * 2048 + 3, true), (1000, false)] {
        let s = shape(&[n]);
        guard(r, "swiglu", &s, |r| swiglu_rows(gpu, r, seed, n, timed));
    }
    for (rows, stride, offset, half, timed) in [(32768, 192, 128, 32, true), (3, 2, 0, 1, false)] {
        let s = format!(
            "{}, rope {offset}..{}",
            shape(&[rows, stride]),
            offset + 2 * half
        );
        guard(r, "rope", &s, |r| {
            rope_rows(gpu, r, seed, (rows, stride, offset, half), timed)
        });
    }
    for (rows, v, timed) in [(256, 129_280, true), (3, 1000, false)] {
        let s = shape(&[rows, v]);
        guard(r, "cross_entropy", &s, |r| {
            ce_rows(gpu, r, seed, rows, v, timed)
        });
    }
    for (n, vocab, d, timed) in [(4096, 16_384, 2048, true), (5, 9, 7, false)] {
        let s = format!("{n} ids, {}", shape(&[vocab, d]));
        guard(r, "embedding", &s, |r| {
            embedding_rows(gpu, r, seed, (n, vocab, d), timed)
        });
    }
}

fn rmsnorm_rows(gpu: &Gpu, r: &mut Report, seed: u64, n: usize, d: usize, timed: bool) -> R<()> {
    let s = shape(&[n, d]);
    let eps = 1e-6;
    let mut x = normals(seed, "rms x", n * d);
    // rows at very different magnitudes, and one all-zero row (rstd = 1/sqrt(eps))
    for (i, row) in x.chunks_mut(d).enumerate() {
        let mag = 10f32.powi((i % 7) as i32 - 3);
        row.iter_mut()
            .for_each(|v| *v *= if i == 1 { 0.0 } else { mag });
    }
    let w = normals(seed, "rms w", d);
    let dy = normals(seed, "rms dy", n * d);
    let (mut y, mut rstd) = (vec![0f32; n * d], vec![0f32; n]);
    rmsnorm::forward(&mut y, &mut rstd, &x, &w, d, eps);
    let (gx, gw) = (gpu.upload(&x)?, gpu.upload(&w)?);
    let (gdy, grs) = (gpu.upload(&dy)?, gpu.upload(&rstd)?);
    let (mut gy, mut grstd) = (gpu.zeros::<f32>(n * d)?, gpu.zeros::<f32>(n)?);
    gpu.rmsnorm_forward(&mut gy, &mut grstd, &gx, &gw, n, d, eps)?;
    r.rel("rmsnorm_forward", &s, "y", &gpu.download(&gy)?, &y);
    r.rel("rmsnorm_forward", &s, "rstd", &gpu.download(&grstd)?, &rstd);
    for acc in [false, true] {
        let prior = normals(seed, "rms dx prior", n * d);
        let mut dx = prior.clone();
        rmsnorm::backward_input(&mut dx, &dy, &x, &rstd, &w, d, acc);
        let mut gdx = gpu.upload(&prior)?;
        gpu.rmsnorm_backward_input(&mut gdx, &gdy, &gx, &grs, &gw, n, d, acc)?;
        let what = if acc { "dx (accumulate)" } else { "dx" };
        r.rel(
            "rmsnorm_backward_input",
            &s,
            what,
            &gpu.download(&gdx)?,
            &dx,
        );
    }
    let mut dw = normals(seed, "rms dw prior", d);
    let mut gdw = gpu.upload(&dw)?;
    rmsnorm::backward_weight(&mut dw, &dy, &x, &rstd, d);
    gpu.rmsnorm_backward_weight(&mut gdw, &gdy, &gx, &grs, n, d)?;
    r.bits(
        "rmsnorm_backward_weight",
        &s,
        "dw",
        &gpu.download(&gdw)?,
        &dw,
    );
    if timed {
        let nd = (n * d * 4) as f64;
        let ms = gpu.time_ms(20, || {
            gpu.rmsnorm_forward(&mut gy, &mut grstd, &gx, &gw, n, d, eps)
        });
        r.timing("rmsnorm_forward", &s, ms, 2.0 * nd);
        let mut gdx = gpu.zeros::<f32>(n * d)?;
        let ms = gpu.time_ms(20, || {
            gpu.rmsnorm_backward_input(&mut gdx, &gdy, &gx, &grs, &gw, n, d, false)
        });
        r.timing("rmsnorm_backward_input", &s, ms, 3.0 * nd);
        let ms = gpu.time_ms(20, || {
            gpu.rmsnorm_backward_weight(&mut gdw, &gdy, &gx, &grs, n, d)
        });
        r.timing("rmsnorm_backward_weight", &s, ms, 2.0 * nd);
    }
    Ok(())
}

fn swiglu_rows(gpu: &Gpu, r: &mut Report, seed: u64, n: usize, timed: bool) -> R<()> {
    let s = shape(&[n]);
    let mut a = scaled(seed, "swiglu a", n, 3.0);
    sprinkle(&mut a, seed, "swiglu a specials", n / 1000 + 10);
    let b = normals(seed, "swiglu b", n);
    let dh = normals(seed, "swiglu dh", n);
    let mut h = vec![0f32; n];
    swiglu::forward(&mut h, &a, &b);
    let (ga, gb, gdh) = (gpu.upload(&a)?, gpu.upload(&b)?, gpu.upload(&dh)?);
    let mut gh = gpu.zeros::<f32>(n)?;
    gpu.swiglu_forward(&mut gh, &ga, &gb)?;
    r.rel("swiglu_forward", &s, "h", &gpu.download(&gh)?, &h);
    let (mut da, mut db) = (vec![0f32; n], vec![0f32; n]);
    swiglu::backward_input(&mut da, &mut db, &dh, &a, &b);
    let (mut gda, mut gdb) = (gpu.zeros::<f32>(n)?, gpu.zeros::<f32>(n)?);
    gpu.swiglu_backward_input(&mut gda, &mut gdb, &gdh, &ga, &gb)?;
    r.rel("swiglu_backward_input", &s, "da", &gpu.download(&gda)?, &da);
    r.rel("swiglu_backward_input", &s, "db", &gpu.download(&gdb)?, &db);
    if timed {
        let ms = gpu.time_ms(20, || gpu.swiglu_forward(&mut gh, &ga, &gb));
        r.timing("swiglu_forward", &s, ms, (n * 12) as f64);
        let ms = gpu.time_ms(20, || {
            gpu.swiglu_backward_input(&mut gda, &mut gdb, &gdh, &ga, &gb)
        });
        r.timing("swiglu_backward_input", &s, ms, (n * 20) as f64);
    }
    Ok(())
}

fn rope_rows(
    gpu: &Gpu,
    r: &mut Report,
    seed: u64,
    (rows, stride, offset, half): (usize, usize, usize, usize),
    timed: bool,
) -> R<()> {
    let s = format!(
        "{}, rope {offset}..{}",
        shape(&[rows, stride]),
        offset + 2 * half
    );
    let table_rows = 4096;
    let yarn = Yarn {
        factor: 40.0,
        original_max_position: 4096.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
    };
    let table = RopeTable::new(2 * half, 10_000.0, table_rows, Some(yarn));
    let pos32 = indices(seed, "rope positions", rows, table_rows);
    let positions: Vec<usize> = pos32.iter().map(|&p| p as usize).collect();
    let x = normals(seed, "rope x", rows * stride);
    let (gcos, gsin) = (gpu.upload(&table.cos)?, gpu.upload(&table.sin)?);
    let gpos = gpu.upload_indices(&pos32, table_rows)?;
    for backward in [false, true] {
        let mut cpu = x.clone();
        if backward {
            rope::backward_input(&mut cpu, stride, offset, &positions, &table);
        } else {
            rope::forward(&mut cpu, stride, offset, &positions, &table);
        }
        let mut gx = gpu.upload(&x)?;
        gpu.rope(&mut gx, stride, offset, &gpos, &gcos, &gsin, half, backward)?;
        let k = if backward {
            "rope_backward_input"
        } else {
            "rope_forward"
        };
        r.bits(k, &s, "x", &gpu.download(&gx)?, &cpu);
        if timed {
            let ms = gpu.time_ms(20, || {
                gpu.rope(&mut gx, stride, offset, &gpos, &gcos, &gsin, half, backward)
            });
            r.timing(k, &s, ms, (rows * half * 16) as f64);
        }
    }
    Ok(())
}

fn ce_rows(gpu: &Gpu, r: &mut Report, seed: u64, rows: usize, v: usize, timed: bool) -> R<()> {
    let s = shape(&[rows, v]);
    let (logits, targets, per_row, total) = ce_case(seed, rows, v);
    let (gl, gt) = (gpu.upload(&logits)?, gpu.upload_indices(&targets, v)?);
    let (mut gloss, mut gtotal) = (gpu.zeros::<f32>(rows)?, gpu.zeros::<f64>(1)?);
    gpu.cross_entropy_forward(&mut gloss, &mut gtotal, &gl, &gt, v)?;
    let loss = gpu.download(&gloss)?;
    let gsum = gpu.download(&gtotal)?[0];
    r.rel(
        "cross_entropy_forward_rows",
        &s,
        "loss per row",
        &loss,
        &per_row,
    );
    // the sum kernel is judged on the GPU's own rows: the f64 sum in row order, bit for bit
    r.ce_total(&s, &loss, gsum, total);
    let scale = 1.0 / rows as f32;
    let mut d = vec![0f32; rows * v];
    cross_entropy::backward_input(&mut d, &logits, &targets, v, scale);
    let mut gd = gpu.zeros::<f32>(rows * v)?;
    gpu.cross_entropy_backward_input(&mut gd, &gl, &gt, v, scale)?;
    r.rel(
        "cross_entropy_backward_input",
        &s,
        "dlogits",
        &gpu.download(&gd)?,
        &d,
    );
    if timed {
        let ms = gpu.time_ms(20, || {
            gpu.cross_entropy_forward(&mut gloss, &mut gtotal, &gl, &gt, v)
        });
        r.timing(
            "cross_entropy_forward (+sum)",
            &s,
            ms,
            (rows * v * 4) as f64,
        );
        let ms = gpu.time_ms(20, || {
            gpu.cross_entropy_backward_input(&mut gd, &gl, &gt, v, scale)
        });
        r.timing(
            "cross_entropy_backward_input",
            &s,
            ms,
            (rows * v * 12) as f64,
        );
    }
    Ok(())
}

fn embedding_rows(
    gpu: &Gpu,
    r: &mut Report,
    seed: u64,
    (n, vocab, d): (usize, usize, usize),
    timed: bool,
) -> R<()> {
    let s = format!("{n} ids, {}", shape(&[vocab, d]));
    let table = normals(seed, "emb table", vocab * d);
    let ids = indices(seed, "emb ids", n, vocab);
    let mut out = vec![0f32; n * d];
    embedding::forward(&mut out, &ids, &table, d);
    let (gtable, gids) = (gpu.upload(&table)?, gpu.upload_indices(&ids, vocab)?);
    let mut gout = gpu.zeros::<f32>(n * d)?;
    gpu.embedding_forward(&mut gout, &gids, &gtable, d)?;
    r.bits("embedding_forward", &s, "out", &gpu.download(&gout)?, &out);
    let dout = normals(seed, "emb dout", n * d);
    let mut dtable = scaled(seed, "emb dtable prior", vocab * d, 1e-3);
    let mut gdt = gpu.upload(&dtable)?;
    embedding::backward_weight(&mut dtable, &ids, &dout, d);
    let gdout = gpu.upload(&dout)?;
    gpu.embedding_backward_weight(&mut gdt, &gids, &gdout, d)?;
    r.bits(
        "embedding_backward_weight",
        &s,
        "dtable",
        &gpu.download(&gdt)?,
        &dtable,
    );
    if timed {
        let ms = gpu.time_ms(20, || gpu.embedding_forward(&mut gout, &gids, &gtable, d));
        r.timing("embedding_forward", &s, ms, (n * d * 8) as f64);
        let ms = gpu.time_ms(20, || {
            gpu.embedding_backward_weight(&mut gdt, &gids, &gdout, d)
        });
        r.timing("embedding_backward_weight", &s, ms, (n * d * 12) as f64);
    }
    Ok(())
}
