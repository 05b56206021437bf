//! The two network tiers a [`Plan`] runs on.
//!
//! - [`run_turmoil`]: a turmoil simulation. The broker, the operator, the
//!   fleet controller and every device are turmoil hosts; their messages cross turmoil's network
//!   as TCP segments, so partitions drop them, holds delay them and a
//!   crashed host loses its sockets. turmoil advances every host in lockstep
//!   ticks of [`TURMOIL_TICK`]; it is the reference for network fidelity
//!   with a few devices.
//! - [`run_events`]: a discrete-event tier for fleets. The same agent loop,
//!   core, fakes, broker, invariants and plans run in one paused tokio
//!   runtime, which jumps straight to the next timer when every task is
//!   idle: a quiet device costs nothing between its deadlines. Links are
//!   in-memory pipes with per-link latency, and partitions and holds
//!   modelled by the relay between the two ends.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podfleet_core::reconciler::Bugs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, LocalSet};

use crate::broker::Broker;
use crate::plan::Plan;
use crate::world::{
    device_id, device_software, fleet_controller, operator, run_plan, BoxRead, BoxWrite, Device,
    Dialer, Dialing, LinkState, Network, Outcome, Shared, SimClock, World,
};

/// turmoil's step. The agent's shortest deadline is the 200 ms libpod-race
/// retry, so 100 ms resolves every deadline it has while costing a tenth of
/// the 1 ms default per simulated second.
pub const TURMOIL_TICK: Duration = Duration::from_millis(100);
const BROKER_PORT: u16 = 4222;

/// Switches for tests that prove the invariants bite.
#[derive(Debug, Clone, Copy, Default)]
pub struct Switches {
    /// Deliberate bugs in the reconciler.
    pub bugs: Bugs,
    /// A deliberately wrong adapter that watches every device's keys.
    pub watch_everyone: bool,
    /// Deliberate bugs in the NATS session of every device's link.
    pub session_bugs: podfleet_core::session::Bugs,
    /// Deliberate bugs in the fleet controller.
    pub fleet_bugs: podfleet_core::fleet::controller::Bugs,
    /// Keep every trace line (for `SIM_SEED`).
    pub keep_trace: bool,
}

fn shared(
    plan: &Plan,
    clock: &SimClock,
    switches: Switches,
) -> (
    Shared,
    mpsc::UnboundedReceiver<crate::world::OperatorCommand>,
) {
    let world = World::new(switches.keep_trace);
    let devices = (0..plan.devices)
        .map(|i| {
            let mut d = Device::new(i, clock.clone(), world.clone(), switches.bugs);
            d.watch_everyone = switches.watch_everyone;
            d.session_bugs = switches.session_bugs;
            d
        })
        .collect();
    let (operator, commands) = mpsc::unbounded_channel();
    (
        Shared {
            world,
            broker: {
                let broker = Broker::default()
                    .with_max_payload(usize::try_from(plan.max_payload).unwrap_or(usize::MAX));
                match plan.state_max_value {
                    Some(limit) => {
                        broker.with_max_state_value(usize::try_from(limit).unwrap_or(usize::MAX))
                    }
                    None => broker,
                }
            },
            devices,
            operator,
        },
        commands,
    )
}

#[derive(Debug, Clone, Copy)]
struct TurmoilDialer;

impl Dialer for TurmoilDialer {
    fn dial(&self, _who: &str) -> Dialing {
        Box::pin(async {
            let stream = turmoil::net::TcpStream::connect(("broker", BROKER_PORT)).await?;
            let (r, w) = stream.into_split();
            Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
        })
    }
}

struct TurmoilTier<'a> {
    sim: turmoil::Sim<'a>,
    driver_now: Arc<AtomicU64>,
}

fn host(index: u32) -> String {
    device_id(index).to_string()
}

impl Network for TurmoilTier<'_> {
    fn now(&self) -> Duration {
        self.sim.elapsed()
    }

    fn run_until(&mut self, t: Duration) -> Result<(), String> {
        while self.sim.elapsed() < t {
            self.sim.step().map_err(|e| e.to_string())?;
            self.driver_now
                .store(self.sim.elapsed().as_millis() as u64, Ordering::SeqCst);
        }
        Ok(())
    }

    fn set_link(&mut self, index: u32, state: LinkState) {
        let h = host(index);
        match state {
            LinkState::Up => {
                self.sim.repair(h.as_str(), "broker");
                self.sim.release(h.as_str(), "broker");
            }
            LinkState::Partitioned => self.sim.partition(h.as_str(), "broker"),
            LinkState::Held => self.sim.hold(h.as_str(), "broker"),
        }
    }

    fn crash_agent(&mut self, index: u32) {
        self.sim.crash(host(index).as_str());
    }

    fn start_agent(&mut self, index: u32) {
        self.sim.bounce(host(index).as_str());
    }

    fn restart_broker(&mut self) {
        self.sim.bounce("broker");
    }

    fn crash_controller(&mut self) {
        self.sim.crash("controller");
    }

    fn start_controller(&mut self) {
        self.sim.bounce("controller");
    }
}

/// Runs `plan` on turmoil.
pub fn run_turmoil(plan: &Plan, switches: Switches) -> Outcome {
    let driver_now = Arc::new(AtomicU64::new(0));
    let clock = SimClock::Turmoil(Arc::clone(&driver_now));
    let (shared, commands) = shared(plan, &clock, switches);
    let total = Duration::from_millis(plan.heal_at_ms)
        + crate::world::LIVENESS_BOUND
        + crate::world::QUIET_PERIOD
        + Duration::from_secs(60);
    let mut sim = turmoil::Builder::new()
        .tick_duration(TURMOIL_TICK)
        .simulation_duration(total)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(1 + plan.seed % 80))
        .tcp_capacity(4096)
        .rng_seed(plan.seed)
        .build();

    let broker = shared.broker.clone();
    sim.host("broker", move || {
        let broker = broker.clone();
        async move {
            let listener = turmoil::net::TcpListener::bind(("0.0.0.0", BROKER_PORT)).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                let (r, w) = stream.into_split();
                let broker = broker.clone();
                tokio::task::spawn_local(async move { broker.serve(r, w).await });
            }
        }
    });
    let commands = Rc::new(RefCell::new(Some(commands)));
    let world = shared.world.clone();
    let op_clock = clock.clone();
    sim.host("operator", move || {
        let commands = commands.borrow_mut().take();
        let world = world.clone();
        let clock = op_clock.clone();
        async move {
            if let Some(commands) = commands {
                operator(TurmoilDialer, clock, world, commands).await;
            }
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    let world = shared.world.clone();
    let controller_clock = clock.clone();
    let fleet_bugs = switches.fleet_bugs;
    sim.host("controller", move || {
        let world = world.clone();
        let clock = controller_clock.clone();
        async move {
            fleet_controller(TurmoilDialer, clock, world, fleet_bugs).await;
            Ok(())
        }
    });
    for device in &shared.devices {
        let device = device.clone();
        let clock = clock.clone();
        sim.host(host(device.index).as_str(), move || {
            let software = device_software(device.clone(), TurmoilDialer, clock.clone());
            async move {
                software.await;
                Ok(())
            }
        });
    }
    let mut tier = TurmoilTier { sim, driver_now };
    run_plan(plan, &mut tier, &shared)
}

/// Per-link state in the event tier.
#[derive(Debug, Default)]
struct NetState {
    links: BTreeMap<String, LinkState>,
    latency: Duration,
    broker_tasks: Vec<AbortHandle>,
}

#[derive(Debug, Clone)]
struct EventDialer {
    net: Arc<Mutex<NetState>>,
    broker: Broker,
}

impl Dialer for EventDialer {
    fn dial(&self, who: &str) -> Dialing {
        let who = who.strip_prefix("device:").unwrap_or(who).to_owned();
        let net = Arc::clone(&self.net);
        let broker = self.broker.clone();
        Box::pin(async move {
            let partitioned = {
                let n = net
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                n.links.get(&who) == Some(&LinkState::Partitioned)
            };
            if partitioned {
                tokio::time::sleep(Duration::from_secs(3)).await;
                return Err(io::Error::new(io::ErrorKind::TimedOut, "partitioned"));
            }
            let (client, client_relay) = tokio::io::duplex(64 * 1024);
            let (broker_relay, broker_end) = tokio::io::duplex(64 * 1024);
            let (cr_read, cr_write) = tokio::io::split(client_relay);
            let (br_read, br_write) = tokio::io::split(broker_relay);
            let up =
                tokio::task::spawn_local(relay(Arc::clone(&net), who.clone(), cr_read, br_write));
            let down =
                tokio::task::spawn_local(relay(Arc::clone(&net), who.clone(), br_read, cr_write));
            let (r, w) = tokio::io::split(broker_end);
            let serve = tokio::task::spawn_local(async move {
                broker.serve(r, w).await;
                up.abort();
                down.abort();
            });
            net.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .broker_tasks
                .push(serve.abort_handle());
            let (r, w) = tokio::io::split(client);
            Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
        })
    }
}

/// Copies bytes from `from` to `to` as the link `who` allows: after the
/// link's latency, never while it is held, and not at all while it is
/// partitioned (the chunk is lost and the stream stalls, as on a real link;
/// the connection then dies of silence).
async fn relay(
    net: Arc<Mutex<NetState>>,
    who: String,
    mut from: tokio::io::ReadHalf<tokio::io::DuplexStream>,
    mut to: tokio::io::WriteHalf<tokio::io::DuplexStream>,
) {
    let link = |net: &Mutex<NetState>| {
        let net = net
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (
            net.links.get(&who).copied().unwrap_or(LinkState::Up),
            net.latency,
        )
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        tokio::time::sleep(link(&net).1).await;
        loop {
            match link(&net).0 {
                LinkState::Up => break,
                LinkState::Partitioned => return std::future::pending().await,
                LinkState::Held => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

struct EventTier {
    rt: tokio::runtime::Runtime,
    local: LocalSet,
    origin: tokio::time::Instant,
    net: Arc<Mutex<NetState>>,
    shared: Shared,
    dialer: EventDialer,
    clock: SimClock,
    agents: Vec<Option<JoinHandle<()>>>,
    controller: Option<JoinHandle<()>>,
    fleet_bugs: podfleet_core::fleet::controller::Bugs,
}

impl EventTier {
    fn spawn_controller(&mut self) {
        let controller = fleet_controller(
            self.dialer.clone(),
            self.clock.clone(),
            self.shared.world.clone(),
            self.fleet_bugs,
        );
        self.controller = Some(self.local.spawn_local(controller));
    }

    fn spawn_agent(&mut self, index: u32) {
        let Some(device) = self.shared.devices.get(index as usize).cloned() else {
            return;
        };
        let software = device_software(device, self.dialer.clone(), self.clock.clone());
        let handle = self.local.spawn_local(software);
        if let Some(slot) = self.agents.get_mut(index as usize) {
            *slot = Some(handle);
        }
    }
}

impl Network for EventTier {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn run_until(&mut self, t: Duration) -> Result<(), String> {
        let deadline = self.origin + t;
        self.local
            .block_on(&self.rt, tokio::time::sleep_until(deadline));
        Ok(())
    }

    fn set_link(&mut self, index: u32, state: LinkState) {
        self.net
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .links
            .insert(host(index), state);
    }

    fn crash_agent(&mut self, index: u32) {
        if let Some(handle) = self.agents.get_mut(index as usize).and_then(Option::take) {
            handle.abort();
        }
    }

    fn start_agent(&mut self, index: u32) {
        if self.agents.get(index as usize).is_some_and(Option::is_none) {
            self.spawn_agent(index);
        }
    }

    fn crash_controller(&mut self) {
        if let Some(handle) = self.controller.take() {
            handle.abort();
        }
    }

    fn start_controller(&mut self) {
        if self.controller.is_none() {
            self.spawn_controller();
        }
    }

    fn restart_broker(&mut self) {
        let tasks = std::mem::take(
            &mut self
                .net
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .broker_tasks,
        );
        for task in tasks {
            task.abort();
        }
    }
}

/// Runs `plan` on the discrete-event tier.
pub fn run_events(plan: &Plan, switches: Switches) -> Outcome {
    run_events_with(plan, switches, |_| {})
}

/// Runs `plan` on the discrete-event tier, then hands `inspect` what the
/// run leaves behind (the devices' runtimes, reports and the broker), still
/// inside the simulated runtime, so that its clocks read simulated time.
pub fn run_events_with(plan: &Plan, switches: Switches, inspect: impl FnOnce(&Shared)) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    let _context = rt.enter();
    let origin = tokio::time::Instant::now();
    let clock = SimClock::Tokio(origin);
    let (shared, commands) = shared(plan, &clock, switches);
    let net = Arc::new(Mutex::new(NetState {
        latency: Duration::from_millis(1 + plan.seed % 50),
        ..NetState::default()
    }));
    let dialer = EventDialer {
        net: Arc::clone(&net),
        broker: shared.broker.clone(),
    };
    let local = LocalSet::new();
    local.spawn_local(operator(
        dialer.clone(),
        clock.clone(),
        shared.world.clone(),
        commands,
    ));
    let mut tier = EventTier {
        rt,
        local,
        origin,
        net,
        agents: (0..shared.devices.len()).map(|_| None).collect(),
        shared: shared.clone(),
        dialer,
        clock,
        controller: None,
        fleet_bugs: switches.fleet_bugs,
    };
    tier.spawn_controller();
    for i in 0..plan.devices {
        tier.spawn_agent(i);
    }
    let outcome = run_plan(plan, &mut tier, &shared);
    inspect(&shared);
    outcome
}
