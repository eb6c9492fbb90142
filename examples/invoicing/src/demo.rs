//! The end-to-end demo: W workers in this process (one of every two failing
//! 20 % of its reconciles), N orders shipped (10 % by the legacy path, with no
//! event), progress until every order is invoiced exactly once.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use converge::WorkerHandle;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use crate::check::{check, progress, CheckReport};
use crate::domain::{ship, ShipOptions, ShipReport};
use crate::error::{connect_nats, connect_postgres, InvoicingError};
use crate::faults::Faults;
use crate::reconciler::ReconcileStats;
use crate::schema::{migrate, truncate};
use crate::worker::{self, StreamNames, SweepTiming, WorkerOptions};

/// The fraction of orders shipped by the legacy path.
pub const LEGACY_FRACTION: f64 = 0.1;

/// The failure rate of every second worker.
pub const FAIL_RATE: f64 = 0.2;

/// The demo's sweep period: legacy orders converge within it.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// How long a demo worker keeps trying to start while the failure is transient.
const START_WITHIN: Duration = Duration::from_secs(30);

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// PostgreSQL.
    pub database_url: String,
    /// NATS.
    pub nats_url: String,
    /// The stream (deleted and recreated: the demo starts clean).
    pub stream: StreamNames,
    /// The converge application name.
    pub app: String,
    /// Orders to ship.
    pub orders: u64,
    /// Workers to start.
    pub workers: usize,
    /// How long to wait for convergence.
    pub timeout: Duration,
    /// Connections in each worker's pool.
    pub max_connections: u32,
}

/// How the demo ended.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// Whether every order was invoiced exactly once in time.
    pub converged: bool,
    /// The final check.
    pub report: CheckReport,
    /// From the first shipment to convergence (or the timeout).
    pub elapsed: Duration,
}

/// Runs the demo; prints progress on stderr and the result on stdout, ending
/// with `converged: <orders> orders, <invoices> invoices, <charges> charges, 0
/// duplicates in <secs> s` — or `not converged after …` and the reasons, when
/// anything disagrees or the timeout passed.
pub async fn run(opts: &DemoOptions) -> Result<DemoOutcome, InvoicingError> {
    let pool = connect_postgres(&opts.database_url, 4).await?;
    let nats = connect_nats(&opts.nats_url).await?;
    migrate(&pool).await?;
    start_clean(&pool, &nats, &opts.stream).await?;
    eprintln!(
        "demo: {} orders ({:.0} % by the legacy path, no event), {} workers, stream {}, app {}",
        opts.orders,
        LEGACY_FRACTION * 100.0,
        opts.workers,
        opts.stream.stream,
        opts.app
    );

    // The external side effect: a local billing service, every order
    // charged through it under its step's idempotency key.
    let (billing_stop, billing_stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let billing_task = tokio::spawn(crate::billing::serve(
        ([127, 0, 0, 1], 0).into(),
        Duration::from_millis(5),
        move |addr| {
            let _ = bound_tx.send(addr);
        },
        async move {
            let _ = billing_stopped.await;
        },
    ));
    let billing_addr = bound_rx
        .await
        .map_err(|_| InvoicingError::InvalidArgument {
            option: "demo",
            message: "the local billing service did not start".into(),
        })?;
    let billing =
        crate::billing::BillingClient::new(&format!("http://{billing_addr}")).map_err(|e| {
            InvoicingError::InvalidArgument {
                option: "demo",
                message: format!("billing client: {e}"),
            }
        })?;
    eprintln!("billing service on http://{billing_addr}");

    let stats = Arc::new(ReconcileStats::default());
    let mut workers = Vec::with_capacity(opts.workers);
    let mut worker_pools = Vec::with_capacity(opts.workers);
    for i in 1..=opts.workers {
        let worker_pool = connect_postgres(&opts.database_url, opts.max_connections).await?;
        let mut options = WorkerOptions::new(opts.app.clone(), opts.stream.clone());
        options.instance = Some(format!("demo-{i}"));
        if i % 2 == 0 {
            options.faults = Faults {
                fail_rate: FAIL_RATE,
                ..Faults::NONE
            };
        }
        options.sweep = SweepTiming::Every(SWEEP_EVERY);
        options.claim_lease = Duration::from_secs(10);
        // Injected failures are retried, not dead-lettered (0.2^10 is negligible).
        options.max_attempts = 10;
        options.stats = stats.clone();
        options.billing = Some(billing.clone());
        let handle = match worker::start_retrying(&worker_pool, &nats, &options, START_WITHIN).await
        {
            Ok(handle) => handle,
            Err(e) => {
                stop(workers).await;
                return Err(e);
            }
        };
        eprintln!(
            "worker {} started{}",
            handle.instance(),
            if options.faults.fail_rate > 0.0 {
                format!(
                    " (fails {:.0} % of its reconciles, retried)",
                    options.faults.fail_rate * 100.0
                )
            } else {
                String::new()
            }
        );
        workers.push(handle);
        worker_pools.push(worker_pool);
    }

    let started = Instant::now();
    let shipping = {
        let pool = pool.clone();
        let ship_options = ShipOptions {
            orders: opts.orders,
            legacy_fraction: LEGACY_FRACTION,
            concurrency: 4,
        };
        tokio::spawn(async move { ship(&pool, &ship_options).await })
    };
    let waited = wait_for_convergence(&pool, opts, shipping, started).await;
    let elapsed = started.elapsed();
    stop(workers).await;
    for worker_pool in worker_pools {
        worker_pool.close().await;
    }
    let shipped = waited?;

    let mut report = check(&pool).await?;
    report.add_billing(&pool, &billing).await?;
    let _ = billing_stop.send(());
    let _ = billing_task.await;
    pool.close().await;
    let charges = report.billing.as_ref().map_or(0, |b| b.charges);
    let charged_twice = report
        .billing
        .as_ref()
        .map_or(0, |b| b.charged_twice.len() as i64);
    // Converged only if shipping finished in time, every order asked for
    // exists, and orders, invoices and charges agree.
    let converged = report.converged
        && shipped.is_some()
        && report.orders == opts.orders as i64
        && report.invoices == report.orders
        && charges == report.orders as u64;
    let s = stats.snapshot();
    if let Some(shipped) = &shipped {
        println!("{shipped}");
    }
    println!(
        "invoiced by event: {}, by sweep: {}; injected failures retried: {}; expired claims resumed: {}",
        s.invoiced_by_event, s.invoiced_by_sweep, s.injected_failures, s.resumed_claims
    );
    if converged {
        println!(
            "converged: {} orders, {} invoices, {} charges, {} duplicates in {:.1} s",
            report.orders,
            report.invoices,
            charges,
            report.duplicates + charged_twice,
            elapsed.as_secs_f64()
        );
    } else {
        println!("{report}");
        let mut why = report.problems();
        if shipped.is_none() {
            why.insert(0, "shipping did not finish".into());
        }
        if report.orders != opts.orders as i64 {
            why.push(format!("{} of {} orders exist", report.orders, opts.orders));
        }
        if elapsed >= opts.timeout {
            why.insert(0, format!("timed out after {:?}", opts.timeout));
        }
        println!(
            "not converged after {:.1} s: {}",
            elapsed.as_secs_f64(),
            why.join("; ")
        );
    }
    Ok(DemoOutcome {
        converged,
        report,
        elapsed,
    })
}

/// Deletes the example's orders and invoices and its stream, so that a repeated
/// demo starts from nothing.
async fn start_clean(
    pool: &PgPool,
    nats: &async_nats::Client,
    stream: &StreamNames,
) -> Result<(), InvoicingError> {
    truncate(pool).await?;
    let js = async_nats::jetstream::new(nats.clone());
    if js.get_stream(&stream.stream).await.is_ok() {
        js.delete_stream(&stream.stream)
            .await
            .map_err(|e| InvoicingError::JetStream {
                action: "deleting the demo's stream",
                message: e.to_string(),
            })?;
    }
    Ok(())
}

async fn stop(workers: Vec<WorkerHandle>) {
    for handle in workers {
        let instance = handle.instance().to_owned();
        if let Err(e) = handle.shutdown().await {
            eprintln!("worker {instance} did not stop cleanly: {e}");
        }
    }
}

/// Polls progress until every order is invoiced (and the check agrees) or the
/// timeout passes. `Ok(None)`: shipping did not finish in time.
async fn wait_for_convergence(
    pool: &PgPool,
    opts: &DemoOptions,
    mut shipping: tokio::task::JoinHandle<Result<ShipReport, InvoicingError>>,
    started: Instant,
) -> Result<Option<ShipReport>, InvoicingError> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(opts.orders);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed:>4} [{bar:40.cyan/blue}] {pos}/{len} invoiced {msg}",
            )
            .expect("a valid progress template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut shipped: Option<ShipReport> = None;
    let mut last_line = Instant::now();
    let total = opts.orders as i64;
    loop {
        if shipped.is_none() && shipping.is_finished() {
            let report = (&mut shipping)
                .await
                .map_err(|source| InvoicingError::TaskFailed {
                    task: "shipping",
                    source,
                })??;
            shipped = Some(report);
        }
        let (invoiced, created) = progress(pool).await?;
        if let Some(bar) = &bar {
            bar.set_position(invoiced.max(0) as u64);
            bar.set_message(format!("({created} created)"));
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "progress: {invoiced}/{total} invoiced ({created} created) after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            last_line = Instant::now();
        }
        if shipped.is_some() && invoiced >= total && check(pool).await?.converged {
            break;
        }
        if started.elapsed() >= opts.timeout {
            if shipped.is_none() {
                shipping.abort();
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(shipped)
}
