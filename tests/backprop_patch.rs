//! The patches of the vendored candle-core (`vendor/candle-core/PATCHED.md`): the gradient
//! accumulation (the first gradient reaching a tensor is stored as it is, later ones are added,
//! and the values are those of the unpatched rule), and the 2-D copies that run on rayon's pool
//! when large (every element lands where the serial copy put it).

use candle_core::{Device, Result, Tensor, Var};

/// Address of the storage behind `t` (tensors that share a buffer give the same address).
fn storage_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const _ as usize
}

fn vars() -> Result<(Var, Var)> {
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[[1f32, -2.0, 3.0], [0.5, 4.0, -1.0]], &dev)?)?;
    let b = Var::from_tensor(&Tensor::new(&[[2f32, 1.0, -3.0], [1.5, -0.5, 2.0]], &dev)?)?;
    Ok((a, b))
}

/// In `a + b` both operands receive the output's gradient itself: one storage, no copy.
/// Unpatched, each got its own `zeros + grad` sum.
#[test]
fn first_gradient_is_stored_without_a_copy() -> Result<()> {
    let (a, b) = vars()?;
    let z = (a.as_tensor() + b.as_tensor())?;
    let grads = z.sum_all()?.backward()?;
    let (ga, gb) = (
        grads.get(&a).expect("grad a"),
        grads.get(&b).expect("grad b"),
    );
    assert_eq!(storage_addr(ga), storage_addr(gb));
    assert_eq!(ga.to_vec2::<f32>()?, vec![vec![1.0; 3]; 2]);
    Ok(())
}

/// A tensor consumed three times sums its three gradients, and a strided first gradient (the
/// backward of a transpose) is stored contiguous with the right values.
#[test]
fn fan_in_sums_and_strided_gradients_are_made_contiguous() -> Result<()> {
    let (a, b) = vars()?;
    let (at, bt) = (a.as_tensor(), b.as_tensor());
    // d/da sum(a*b + 3a + a^T-weighted) = b + 3 + w^T
    let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
    let loss = ((at * bt)?.sum_all()? + (at * 3.0)?.sum_all()? + (at.t()? * &w)?.sum_all()?)?;
    let grads = loss.backward()?;
    let ga = grads.get(&a).expect("grad a");
    assert!(ga.is_contiguous());
    let expect = ((bt + 3.0)? + w.t()?)?;
    assert_eq!(ga.to_vec2::<f32>()?, expect.to_vec2::<f32>()?);
    // b is reached once, through the product: its gradient is a.
    assert_eq!(
        grads.get(&b).expect("grad b").to_vec2::<f32>()?,
        at.to_vec2::<f32>()?
    );
    // Only a transpose consumes c: its one gradient is a strided view, stored contiguous.
    let c = Var::from_tensor(&w)?;
    let grads = (c.as_tensor().t()? * at)?.sum_all()?.backward()?;
    let gc = grads.get(&c).expect("grad c");
    assert!(gc.is_contiguous());
    assert_eq!(gc.to_vec2::<f32>()?, at.t()?.to_vec2::<f32>()?);
    Ok(())
}

/// The parallel 2-D copies put every element where it belongs, above and below the size at
/// which they go parallel (2^16 elements): a channel concatenation (rows of different lengths
/// into one buffer), the narrow its backward takes (made contiguous), a broadcast made
/// contiguous (source rows overlap: stride 0), and a plain contiguous copy.
#[test]
fn large_copies_put_every_element_in_place() -> Result<()> {
    let dev = Device::Cpu;
    let seq = |n: usize, c: usize, hw: usize, base: f32| -> Result<Tensor> {
        let v: Vec<f32> = (0..n * c * hw).map(|i| base + i as f32).collect();
        Tensor::from_vec(v, (n, c, hw), &dev)
    };
    for (n, ca, cb, hw) in [(3, 2, 5, 7), (16, 16, 16, 96 * 96 / 16), (5, 3, 1, 40_000)] {
        let (a, b) = (seq(n, ca, hw, 0.0)?, seq(n, cb, hw, 1e7)?);
        let cat = Tensor::cat(&[&a, &b], 1)?;
        let (av, bv) = (a.to_vec3::<f32>()?, b.to_vec3::<f32>()?);
        let got = cat.to_vec3::<f32>()?;
        for i in 0..n {
            let want: Vec<Vec<f32>> = av[i].iter().chain(&bv[i]).cloned().collect();
            assert!(got[i] == want, "cat, image {i} of {n}×({ca}+{cb})×{hw}");
        }
        let back = cat.narrow(1, ca, cb)?.contiguous()?;
        assert!(
            back.to_vec3::<f32>()? == bv,
            "narrow of {n}×({ca}+{cb})×{hw}"
        );
        let row = Tensor::from_vec((0..hw).map(|i| i as f32).collect(), (1, 1, hw), &dev)?;
        let wide = row.broadcast_as((n, ca, hw))?.contiguous()?;
        let rows = wide.flatten_to(1)?.to_vec2::<f32>()?;
        let want: Vec<f32> = (0..hw).map(|i| i as f32).collect();
        assert!(
            rows.iter().all(|r| *r == want),
            "broadcast to {n}×{ca}×{hw}"
        );
        assert!(a.copy()?.to_vec3::<f32>()? == av, "copy of {n}×{ca}×{hw}");
    }
    Ok(())
}
