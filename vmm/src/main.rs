//! The `vmm` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use guest_mm::ReclaimConfig;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmm::boot::linux::{self, LinuxBoot};
use vmm::config::{parse_size, BootSource, VmConfig};
use vmm::devices::VERDICT_PASS;
use vmm::{guests, Outcome, Vm};

/// A KVM VMM whose guest memory is reclaimed through a stage-2 gather.
#[derive(Parser)]
#[command(name = "vmm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a test guest (--guest) or a Linux kernel (--kernel) and run it until it ends.
    ///
    /// Exit status: 0 when the guest reports PASS on the exit port or powers the machine off
    /// (ACPI S5), 1 when it reports anything else or stops without a verdict, 2 for VMM errors
    /// (bad arguments, KVM unavailable, a guest crash, an instruction KVM cannot emulate), 3
    /// when the guest resets the machine (this VMM does not reboot guests), 128+N after
    /// signal N.
    Run(Box<RunArgs>),
    /// Control the balloon of a running VM through its control socket.
    Balloon(BalloonArgs),
    /// List the project's built test guests.
    Guests,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("image").required(true).args(["guest", "kernel"])))]
struct RunArgs {
    /// Test guest ELF: a path, or the name of a built test guest (see `vmm guests`).
    #[arg(long)]
    guest: Option<String>,
    /// Linux kernel: an ELF vmlinux with a PVH note (booted through PVH) or a bzImage (booted
    /// through the 64-bit boot protocol). Linux gets COM1 (ttyS0, IRQ 4), the virtio balloon
    /// (virtio-mmio, in the DSDT and on the command line) and ACPI tables; see README.md,
    /// "Boot your own kernel".
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel (module 0 of the PVH start info, or boot_params' ramdisk).
    #[arg(long, conflicts_with = "guest")]
    initrd: Option<PathBuf>,
    /// With --kernel: write no ACPI tables. Linux then takes its CPUs from the MP table and,
    /// with no DSDT, finds the balloon only through virtio_mmio.device=
    /// (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; Debian's kernel lacks it).
    #[arg(long, conflicts_with = "guest")]
    no_acpi: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM, e.g. 256M or 2G (K/M/G/T are powers of 1024; must be a multiple of 4 KiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Guest command line, e.g. "rounds=3 bytes=64M" for memtouch. For --kernel the default
    /// is "console=ttyS0 earlyprintk=ttyS0 panic=1", and the VMM appends the balloon's
    /// virtio_mmio.device= entry; it prints the whole line it passes.
    #[arg(long)]
    cmdline: Option<String>,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// How reclaimed memory is batched and returned to the host.
    #[command(flatten)]
    reclaim: ReclaimConfig,
    /// Balloon sizes to set one after another, each once the driver reached the previous,
    /// e.g. "768M,0" (inflate by 768 MiB, then deflate fully).
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    balloon_steps: Vec<u64>,
    /// Seconds to wait for the driver to reach one balloon step.
    #[arg(long, default_value_t = 120)]
    balloon_step_timeout: u64,
    /// Offer free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT): runs are started and
    /// stopped through the control API (`/balloon/hinting/start|status|stop`), and the free
    /// ranges a driver hints are released through the gather like free page reports. Off by
    /// default, as in Firecracker (it adds a queue, which moves reporting to queue 4).
    #[arg(long)]
    balloon_free_page_hinting: bool,
    /// Offer free page reporting (VIRTIO_BALLOON_F_FREE_PAGE_REPORTING): the driver reports
    /// free memory, which is released through the gather before the report is returned. On
    /// by default; `--balloon-free-page-reporting false` leaves it out (for example to see
    /// what hinting alone returns).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    balloon_free_page_reporting: bool,
    /// Write the final balloon/gather/KVM report as JSON to this file.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Serve the control API on this Unix socket (mode 0600; protocol in docs/API.md).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Enable the reclaim probe, a test device on I/O port 0xf6 through which the
    /// `reclaimcheck` guest has the VMM reclaim frames of its choosing (docs/ARCHITECTURE.md).
    /// Off by default: it lets a guest drive the gather directly.
    #[arg(long)]
    reclaim_probe: bool,
    /// Leave the host kernel's fault-around on for guest RAM. By default the VMM turns it
    /// off (a userfaultfd write-protect registration that never write-protects anything), so
    /// that a guest touching frames a zap span bridged does not map the reclaimed frames
    /// next to them back in before they are released (docs/ARCHITECTURE.md). For comparison.
    #[arg(long)]
    keep_host_fault_around: bool,
    #[command(flatten)]
    backing: guest_mm::backing::BackingArgs,
}

#[derive(clap::Args)]
struct BalloonArgs {
    /// The control socket of a running VM (`vmm run --api-sock PATH`).
    #[arg(long)]
    api_sock: PathBuf,
    #[command(subcommand)]
    action: BalloonAction,
}

#[derive(Subcommand)]
enum BalloonAction {
    /// Set the balloon target: how much guest memory to take back, e.g. 768M (0 deflates); a
    /// whole number of MiB (PATCH /balloon).
    Set {
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Print the balloon's target, actual size and the guest's statistics, as Firecracker
    /// names them (GET /balloon/statistics).
    Stats,
    /// Print the balloon's configuration: target, deflate-on-oom, statistics polling
    /// interval, the free page features offered (GET /balloon).
    Config,
    /// Free page hinting (a VM started with --balloon-free-page-hinting): start a run, print
    /// its status, or stop it (PATCH /balloon/hinting/start, GET /balloon/hinting/status,
    /// PATCH /balloon/hinting/stop).
    Hinting {
        #[command(subcommand)]
        action: HintingAction,
    },
    /// Set how often the device asks the guest for statistics, in seconds; 0 stops it
    /// (PATCH /balloon/statistics).
    Polling { seconds: u64 },
    /// Print everything this VMM reports about reclaim: device, gather and KVM counters,
    /// recent batches, host bytes held (GET /vm/reclaim).
    Reclaim,
    /// Print the reclaim settings, or change some (GET/PATCH /vm/reclaim/config), e.g.
    /// `--set zap_span_gap=0 --set strategy=per-buffer`. The keys are the configuration's
    /// fields as `vmm run` takes them, with underscores: strategy, batch_pages,
    /// batch_window_ms, zap_span_gap, partial_blocks (docs/API.md).
    ReclaimConfig {
        /// KEY=VALUE: one setting to change (repeat for more).
        #[arg(long = "set", value_parser = parse_setting)]
        set: Vec<(String, serde_json::Value)>,
    },
}

#[derive(Subcommand)]
enum HintingAction {
    /// Start a run; the device answers the driver's STOP with DONE unless
    /// --no-acknowledge-on-stop is given (then `stop` says DONE). Prints the status.
    Start {
        #[arg(long)]
        no_acknowledge_on_stop: bool,
    },
    /// Print the last command the host issued (0 STOP, 1 DONE, 2+ a run) and the driver's.
    Status,
    /// Say DONE: the driver may reuse the hinted pages. Prints the status.
    Stop,
}

/// KEY=VALUE for `reclaim-config --set`: the value as JSON where it parses (numbers), else
/// as a string (names such as per-buffer).
fn parse_setting(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE, e.g. zap_span_gap=0"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::from(v));
    Ok((k.trim().to_string(), value))
}

fn boot_source(args: &RunArgs) -> anyhow::Result<(BootSource, String)> {
    Ok(match (&args.guest, &args.kernel) {
        (Some(guest), None) => (
            BootSource::TestGuest(guests::resolve(guest)?),
            args.cmdline.clone().unwrap_or_default(),
        ),
        (None, Some(kernel)) => {
            for (what, path) in [
                ("--kernel", Some(kernel)),
                ("--initrd", args.initrd.as_ref()),
            ] {
                if let Some(p) = path {
                    if !p.is_file() {
                        anyhow::bail!("{what} {}: no such file", p.display());
                    }
                }
            }
            (
                BootSource::Linux(LinuxBoot {
                    kernel: kernel.clone(),
                    initrd: args.initrd.clone(),
                    acpi: !args.no_acpi,
                }),
                args.cmdline
                    .clone()
                    .unwrap_or_else(|| linux::DEFAULT_CMDLINE.into()),
            )
        }
        _ => anyhow::bail!("give exactly one of --guest and --kernel"),
    })
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (boot, cmdline) = boot_source(&args)?;
    let backing = args.backing.backing().map_err(anyhow::Error::msg)?;
    let config = VmConfig {
        boot,
        vcpus: args.vcpus,
        memory: args.memory,
        cmdline,
        kvm_device: args.kvm_device,
        reclaim: args.reclaim,
        balloon_steps: args.balloon_steps,
        balloon_step_timeout: Duration::from_secs(args.balloon_step_timeout),
        balloon_features: vmm::devices::balloon::BalloonFeatures {
            free_page_hinting: args.balloon_free_page_hinting,
            free_page_reporting: args.balloon_free_page_reporting,
        },
        api_sock: args.api_sock.clone(),
        reclaim_probe: args.reclaim_probe,
        keep_host_fault_around: args.keep_host_fault_around,
        backing,
    };
    let vm = Vm::new(&config)
        .with_context(|| format!("cannot start guest {}", config.boot.path().display()))?;
    for line in vm.describe() {
        eprintln!("vmm: {line}");
    }
    let report_json = args.report_json.clone();
    let report = vm.run()?;
    for line in report.balloon.summary() {
        vmm::report::say(&line);
    }
    if let Some(path) = report_json {
        let json = serde_json::to_string_pretty(&report.balloon)?;
        std::fs::write(&path, json)
            .with_context(|| format!("cannot write report to {}", path.display()))?;
    }
    let secs = report.elapsed.as_secs_f64();
    Ok(match report.outcome {
        Outcome::Verdict(VERDICT_PASS) => {
            eprintln!("vmm: guest verdict PASS after {secs:.2}s");
            ExitCode::SUCCESS
        }
        Outcome::Verdict(v) => {
            eprintln!("vmm: guest verdict FAIL (exit port value {v:#x}) after {secs:.2}s");
            ExitCode::from(1)
        }
        Outcome::VcpusStopped => {
            eprintln!("vmm: every vCPU stopped without a verdict after {secs:.2}s");
            ExitCode::from(1)
        }
        Outcome::Signal(sig) => {
            eprintln!("vmm: stopped by signal {sig} after {secs:.2}s");
            ExitCode::from(128 + sig as u8)
        }
        Outcome::PowerOff => {
            eprintln!("vmm: the guest powered the machine off after {secs:.2}s");
            ExitCode::SUCCESS
        }
        Outcome::Reset => {
            eprintln!("vmm: the guest reset the machine after {secs:.2}s; this VMM does not reboot guests");
            ExitCode::from(3)
        }
        Outcome::Error(e) => return Err(e.into()),
    })
}

fn balloon(args: BalloonArgs) -> anyhow::Result<ExitCode> {
    let api = vmm::api::ApiClient::new(&args.api_sock)?;
    let out = match args.action {
        BalloonAction::Set { size } => {
            if !size.is_multiple_of(1 << 20) {
                anyhow::bail!(
                    "the balloon target is set in whole MiB (Firecracker's amount_mib); {size} bytes is not"
                );
            }
            api.set_balloon_mib(size >> 20)?;
            serde_json::json!({ "amount_mib": size >> 20 })
        }
        BalloonAction::Stats => api.get("/balloon/statistics")?,
        BalloonAction::Config => api.get("/balloon")?,
        BalloonAction::Polling { seconds } => {
            api.patch(
                "/balloon/statistics",
                &serde_json::json!({ "stats_polling_interval_s": seconds }),
            )?;
            api.get("/balloon")?
        }
        BalloonAction::Hinting { action } => {
            match action {
                HintingAction::Start {
                    no_acknowledge_on_stop,
                } => api.start_hinting(!no_acknowledge_on_stop)?,
                HintingAction::Stop => {
                    api.patch("/balloon/hinting/stop", &serde_json::json!({}))?;
                }
                HintingAction::Status => {}
            }
            api.get("/balloon/hinting/status")?
        }
        BalloonAction::Reclaim => api.get("/vm/reclaim")?,
        BalloonAction::ReclaimConfig { set } => {
            if !set.is_empty() {
                let change: serde_json::Map<String, serde_json::Value> = set.into_iter().collect();
                api.patch("/vm/reclaim/config", &change.into())?;
            }
            api.get("/vm/reclaim/config")?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Balloon(args) => balloon(args),
        Command::Guests => {
            println!("guest directory: {}", guests::guest_dir().display());
            for g in guests::available() {
                println!("{g}");
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}
