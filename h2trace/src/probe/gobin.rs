//! Where to put uprobes in a Go program (`--go-binary`): Go functions must not get return
//! probes (the runtime moves goroutine stacks, and a return trampoline on a moved stack
//! crashes the program), so a function's returns are probed at each of its RET instructions,
//! found by decoding the function's machine code from the binary.
use std::path::Path;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use object::{Object, ObjectSection, ObjectSymbol};

#[derive(Debug, thiserror::Error)]
pub enum GoBinError {
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0} is not an ELF program: {1}")]
    Parse(String, object::Error),
    #[error("{0} has no symbol {1} (not a Go program using crypto/tls, or stripped)")]
    NoSymbol(String, String),
    #[error("{0}: the code of {1} is not in the file")]
    NoCode(String, String),
}

/// The offsets, from the start of `symbol`, of its RET instructions (x86-64).
pub fn ret_offsets(path: &Path, symbol: &str) -> Result<Vec<u64>, GoBinError> {
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| GoBinError::Read(name.clone(), e))?;
    let file = object::File::parse(&*data).map_err(|e| GoBinError::Parse(name.clone(), e))?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(symbol))
        .ok_or_else(|| GoBinError::NoSymbol(name.clone(), symbol.into()))?;
    let (addr, size) = (sym.address(), sym.size());
    let code = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .and_then(|s| s.data_range(addr, size).ok().flatten())
        .ok_or_else(|| GoBinError::NoCode(name.clone(), symbol.into()))?;
    Ok(rets(code, addr))
}

/// Offsets of the RET instructions in `code`, which starts at address `addr`.
fn rets(code: &[u8], addr: u64) -> Vec<u64> {
    Decoder::with_ip(64, code, addr, DecoderOptions::NONE)
        .into_iter()
        .filter(|i| i.mnemonic() == Mnemonic::Ret)
        .map(|i| i.ip() - addr)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rets_not_c3_bytes() {
        // mov eax, 0xc3 (the byte 0xc3 inside an immediate); ret; xor eax, eax; ret
        let code = [0xb8, 0xc3, 0, 0, 0, 0xc3, 0x31, 0xc0, 0xc3];
        assert_eq!(rets(&code, 0x1000), [5, 8]);
    }

    #[test]
    fn a_program_without_the_symbol_is_named() {
        let exe = std::env::current_exe().unwrap();
        let e = ret_offsets(&exe, "crypto/tls.(*Conn).Read").unwrap_err();
        assert!(e.to_string().contains("has no symbol"), "{e}");
    }
}
