use std::{
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Write},
    process::ExitCode,
};

use clap::Parser;
use h2trace::{
    check,
    cli::{Cli, Command, Format, ReplayArgs},
    config,
    filter::Filter,
    output::{Clock, Ndjson, Sink, Text},
    pipeline::Pipeline,
    probe::error_chain,
    run::{self, Outcome},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match config::resolve(&cli.trace) {
        Ok(c) => c,
        Err(e) => return fail(&e, 2),
    };
    match cli.command {
        Some(Command::Check) => {
            let report = check::check(&cfg.probe);
            print!("{}", report.text);
            return ExitCode::from(if report.can_trace { 0 } else { 1 });
        }
        Some(Command::Replay(args)) => return replay(&args),
        None => {}
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e, 1),
    };
    match rt.block_on(run::trace(cfg)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        // An --output that cannot be written is a usage error, found before anything loads.
        Err(e @ run::RunError::Output(..)) => fail(&e, 2),
        Err(e) => fail(&e, 1),
    }
}

fn replay(args: &ReplayArgs) -> ExitCode {
    let detect = match config::detect_config(&args.detect, Default::default()) {
        Ok(d) => d,
        Err(e) => return fail(&e, 2),
    };
    let input: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(io::stdin().lock())
    } else {
        // A directory opens; only its first read would fail, without naming it.
        let opened = File::open(&args.file).and_then(|f| {
            if f.metadata()?.is_dir() {
                Err(io::Error::from(io::ErrorKind::IsADirectory))
            } else {
                Ok(f)
            }
        });
        match opened {
            Ok(f) => Box::new(BufReader::new(f)),
            Err(e) => {
                eprintln!("h2trace: opening {}: {e}", args.file.display());
                return ExitCode::from(2);
            }
        }
    };
    let out: Box<dyn Write> = match &args.output {
        Some(p) => match File::create(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("h2trace: opening {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => Box::new(io::stdout()),
    };
    let out = BufWriter::new(out);
    let clock = Clock { offset_ns: 0 };
    let sink: Box<dyn Sink> = match config::default_format(args.format, args.output.is_some()) {
        Format::Ndjson => Box::new(Ndjson::new(out, clock, Default::default())),
        Format::Text => Box::new(Text::new(out, clock, Default::default())),
    };
    let mut pipeline = Pipeline::new(Filter::default(), detect, sink);
    let recorded = !config::detect_overridden(&args.detect);
    let stats = h2trace::replay::replay(input, &mut pipeline, recorded, &mut io::stderr());
    match (stats, pipeline.write_error) {
        (Err(e), _) => {
            eprintln!("h2trace: reading {}: {e}", args.file.display());
            ExitCode::from(1)
        }
        (_, Some(e)) if e.kind() != io::ErrorKind::BrokenPipe => fail(&e, 1),
        (Ok(s), _) if s.skipped > 0 => {
            eprintln!("h2trace replay: {} of {} lines skipped", s.skipped, s.lines);
            ExitCode::from(3)
        }
        _ => ExitCode::SUCCESS,
    }
}

fn fail(e: &dyn std::error::Error, code: u8) -> ExitCode {
    eprintln!("h2trace: {}", error_chain(e));
    ExitCode::from(code)
}
