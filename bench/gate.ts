/**
 * Benchmark of the ClusterVersion upgrade gate as kube-apiserver calls it: AdmissionReview v1
 * requests POSTed to `/admission/clusterversions` of the real server (`src/main.ts` as a child
 * process, started with `startTestServer()` as the e2e tests do) over loopback HTTPS at 500
 * requests per second, against 10,000 Modules and their PreflightValidationOCP verdicts. Two load
 * generators, one after the other: autocannon (`overallRate`, which sends each second's requests
 * in bursts) and a paced open loop in this process (one request every 2 ms).
 *
 *   node bench/gate.ts            full run: 20 s per case and generator (about 105 s on 2 cores)
 *   node bench/gate.ts --quick    CI smoke run: 3 s per case and generator (about 20 s)
 *   node bench/gate.ts --json     one JSON object on stdout instead of the report
 *   node bench/gate.ts --server-node-options="--cpu-prof --cpu-prof-dir=/tmp/kmm-prof"
 *                                 NODE_OPTIONS for the measured server child only (profiling; note the `=`)
 *
 * Setup: 10,000 KMM Module manifests in `--modules-dir` (the gate's Modules come from the
 * controller's inputs, so the controller runs), and two PreflightValidationOCP objects naming
 * releases by digest whose status says every Module is verified (`allow`) or 100 of them failed
 * (`deny`). The statuses are written while the server runs without its controller
 * (KMM_PREFLIGHT_CONTROLLER=false): the release images do not exist, and a controller seeing a
 * new object would try to resolve them and replace the status. The server is then restarted with
 * the controller, which continues from the stored statuses of the same generation as after any
 * restart. Each case is one ClusterVersion update (the recorded fixture
 * test/fixtures/admission/update-to-4.16.2-by-image.json) to one of the two releases.
 *
 * Exits 0 when the run completed (a missed goal is reported, not failed); 1 on an error (setup
 * failed, a response other than 200, a connection error or timeout, a decision other than the one
 * expected, the time limit); 130 when interrupted. See bench/README.md.
 */
import { benchCommandLine, clockTicks, findServerPid, machineCpuSeconds, pad, progress, round, procStatusKiB, procCpuSeconds } from './lib.ts';
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { Agent, request as httpsRequest } from 'node:https';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { EventEmitter } from 'node:events';
import { nextEntry, summarize as summarizeStatus } from '../src/controller/status.ts';
import type { ModuleStatus } from '../src/api/schema.ts';
import { ROOT, startTestServer, type TestServer } from '../test/helpers/server.ts';

const WEBHOOK_PATH = '/admission/clusterversions';
/** kube-apiserver appends the webhook's timeoutSeconds to the URL. */
const WEBHOOK_URL_PATH = `${WEBHOOK_PATH}?timeout=10s`;
const PFVO = '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidationsocp';
const API_VERSION = 'kmm.sigs.x-k8s.io/v1beta2';
const FIXTURE = join(ROOT, 'test', 'fixtures', 'admission', 'update-to-4.16.2-by-image.json');
/** The kernel of OpenShift 4.16's release, as the controller would have resolved it. */
const RELEASE_KERNEL = '5.14.0-427.22.1.el9_4.x86_64';
/** The kernel the failing Modules map to instead (no mapping matches RELEASE_KERNEL). */
const OTHER_KERNEL = '6.1.0-18-amd64';
const DENY_IMAGE = `quay.io/openshift-release-dev/ocp-release@sha256:${'7e4b'.repeat(16)}`;
const MODULE_FILES = 10;
/** Distinct request bodies (one uid each) the connections cycle through. */
const BODIES = 64;
const GOAL_P99_MS = 5;
const NAMESPACES = ['kmm-operator-system', 'nvidia-gpu-operator', 'openshift-storage', 'mellanox-network', 'intel-qat', 'sriov-network'];
const DRIVERS = ['nvidia-gpu-driver', 'mlx5-ofed', 'intel-qat-driver', 'habana-gaudi', 'ptp-ice', 'lustre-client', 'nfs-ganesha-kmod', 'zfs-kmod'];

// ---- Options ---------------------------------------------------------------------------------

const USAGE = 'usage: node bench/gate.ts [--quick] [--json] [--server-node-options="<NODE_OPTIONS of the server>"]\n';

const args = benchCommandLine('bench/gate.ts', USAGE, { 'server-node-options': { type: 'string' } });

interface Plan {
  readonly mode: 'full' | 'quick';
  readonly modules: number;
  /** Modules the `deny` object reports False (every 100th). */
  readonly failing: number;
  /** Requests per second over all connections: autocannon's overallRate; the paced interval is 1/rate. */
  readonly rate: number;
  readonly connections: number;
  /** Unmeasured load of both cases after the setup, so the runs see a server past its start-up garbage. */
  readonly settleSeconds: number;
  /** Unmeasured load before each run, with the same generator and case. */
  readonly warmupSeconds: number;
  readonly seconds: number;
  /** How long the server may take to judge both releases after its restart. */
  readonly readyTimeoutMs: number;
  /** The whole run is aborted (exit 1) past this. */
  readonly totalLimitMs: number;
}

const PLAN: Plan = args.quick
  ? { mode: 'quick', modules: 10_000, failing: 100, rate: 500, connections: 10, settleSeconds: 2, warmupSeconds: 1, seconds: 3, readyTimeoutMs: 60_000, totalLimitMs: 120_000 }
  : { mode: 'full', modules: 10_000, failing: 100, rate: 500, connections: 10, settleSeconds: 10, warmupSeconds: 2, seconds: 20, readyTimeoutMs: 60_000, totalLimitMs: 5 * 60_000 };

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const runDeadline = Date.now() + PLAN.totalLimitMs;
/** Set by SIGINT/SIGTERM: every bounded loop stops at its next check. */
let stopRequested: NodeJS.Signals | undefined;
function checkDeadline(what: string): void {
  if (stopRequested) throw new Error(`interrupted by ${stopRequested} during ${what}`);
  if (Date.now() > runDeadline) throw new Error(`the benchmark overran its ${PLAN.totalLimitMs / 1000} s limit during ${what}`);
}

// ---- autocannon ------------------------------------------------------------------------------

/** The part of autocannon's programmatic API used here (the package ships no types). */
type AutocannonClient = EventEmitter;
interface AutocannonOptions {
  readonly url: string;
  readonly connections: number;
  readonly overallRate: number;
  readonly duration: number;
  readonly timeout: number;
  readonly method: 'POST';
  readonly headers: Readonly<Record<string, string>>;
  readonly requests: readonly { readonly body: string }[];
  readonly setupClient: (client: AutocannonClient) => void;
  readonly verifyBody: (body: string) => boolean;
  /** Its coordinated-omission correction takes 1/rate seconds for milliseconds; the samples here are kept raw. */
  readonly ignoreCoordinatedOmission: true;
}
interface AutocannonResult {
  readonly errors: number;
  readonly timeouts: number;
  readonly mismatches: number;
  readonly non2xx: number;
  readonly statusCodeStats: Readonly<Record<string, { count: number }>>;
}
interface AutocannonInstance extends EventEmitter {
  stop(): void;
}
type Autocannon = (options: AutocannonOptions, done: (err: Error | null, result: AutocannonResult) => void) => AutocannonInstance;

const require = createRequire(import.meta.url);
const autocannon = require('autocannon') as Autocannon;
const AUTOCANNON_VERSION = (require('autocannon/package.json') as { version: string }).version;

// ---- Statistics ------------------------------------------------------------------------------

interface Summary {
  readonly n: number;
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  readonly max: number;
  readonly mean: number;
}

/** Nearest-rank percentiles, in the unit of the samples. */
function summarize(samples: readonly number[]): Summary {
  if (samples.length === 0) return { n: 0, p50: NaN, p90: NaN, p99: NaN, max: NaN, mean: NaN };
  const s = Float64Array.from(samples).sort();
  const at = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
  return { n: s.length, p50: round(at(50)), p90: round(at(90)), p99: round(at(99)), max: round(s[s.length - 1]!), mean: round(s.reduce((a, b) => a + b, 0) / s.length) };
}

// ---- /proc -----------------------------------------------------------------------------------



interface CpuMark {
  readonly at: number;
  readonly server: number | null;
  readonly self: NodeJS.CpuUsage;
  readonly machine: number | null;
}

const cpuMark = (pid: number | undefined): CpuMark => ({ at: performance.now(), server: procCpuSeconds(pid), self: process.cpuUsage(), machine: machineCpuSeconds() });

interface CpuUse {
  readonly wallSeconds: number;
  /** The server child's CPU (user + system), or null without /proc. */
  readonly serverSeconds: number | null;
  /** This process: autocannon and the bookkeeping. */
  readonly clientSeconds: number;
  /** Everything else on the machine (from /proc/stat), or null. */
  readonly otherSeconds: number | null;
}

function cpuSince(m: CpuMark, pid: number | undefined): CpuUse {
  const now = cpuMark(pid);
  const self = process.cpuUsage(m.self);
  const clientSeconds = (self.user + self.system) / 1e6;
  const serverSeconds = now.server !== null && m.server !== null ? now.server - m.server : null;
  const machine = now.machine !== null && m.machine !== null ? now.machine - m.machine : null;
  return {
    wallSeconds: round((now.at - m.at) / 1000),
    serverSeconds: serverSeconds === null ? null : round(serverSeconds),
    clientSeconds: round(clientSeconds),
    otherSeconds: machine === null || serverSeconds === null ? null : round(Math.max(0, machine - serverSeconds - clientSeconds)),
  };
}

interface Memory {
  readonly vmRssKiB: number | null;
  readonly vmHwmKiB: number | null;
}

const memoryOf = (pid: number | undefined): Memory => ({ vmRssKiB: procStatusKiB(pid, 'VmRSS'), vmHwmKiB: procStatusKiB(pid, 'VmHWM') });

// ---- Setup: Modules, validations, request bodies -------------------------------------------------

interface ModuleRef {
  readonly namespace: string;
  readonly name: string;
  /** Its only kernel mapping is for OTHER_KERNEL: not verified for the release. */
  readonly failing: boolean;
}

function moduleRefs(): ModuleRef[] {
  const every = Math.floor(PLAN.modules / PLAN.failing);
  return Array.from({ length: PLAN.modules }, (_, i) => ({
    namespace: `${NAMESPACES[i % NAMESPACES.length]!}-${Math.floor(i / 500)}`,
    name: `${DRIVERS[i % DRIVERS.length]!}-${i}`,
    failing: i % every === every - 1,
  }));
}

function moduleYaml(m: ModuleRef): string {
  const mapping = m.failing
    ? `        - literal: ${OTHER_KERNEL}
          containerImage: quay.io/acme/${m.name}:\${KERNEL_FULL_VERSION}`
    : `        - regexp: '^.+\\.el9_\\d+\\.x86_64$'
          containerImage: quay.io/acme/${m.name}:\${KERNEL_FULL_VERSION}
        - regexp: '^.+$'
          containerImage: quay.io/acme/${m.name}-generic:\${KERNEL_FULL_VERSION}`;
  return `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata:
  name: ${m.name}
  namespace: ${m.namespace}
spec:
  selector:
    kubernetes.io/arch: amd64
    node-role.kubernetes.io/worker: ""
  moduleLoader:
    container:
      modprobe:
        moduleName: ${m.name.replace(/-\d+$/, '').replace(/-/g, '_')}
      kernelMappings:
${mapping}
`;
}

/** Writes the Modules into MODULE_FILES multi-document files; returns their total size. */
async function writeModules(dir: string, modules: readonly ModuleRef[]): Promise<number> {
  await mkdir(dir, { recursive: true });
  const per = Math.ceil(modules.length / MODULE_FILES);
  let bytes = 0;
  for (let f = 0; f < MODULE_FILES; f++) {
    const text = modules.slice(f * per, (f + 1) * per).map(moduleYaml).join('---\n');
    bytes += Buffer.byteLength(text);
    await writeFile(join(dir, `modules-${String(f).padStart(2, '0')}.yaml`), text);
  }
  return bytes;
}

/** The status the controller would have written at the end of the validation. */
function finishedStatus(modules: readonly ModuleRef[], failingFails: boolean, generation: number) {
  const now = new Date();
  const entries: ModuleStatus[] = modules.map((m) =>
    nextEntry(
      undefined,
      m,
      m.failing && failingFails
        ? {
            verificationStatus: 'False',
            verificationStage: 'Requeued',
            statusReason: `no kernelMapping of Module ${m.namespace}/${m.name} matches kernel ${RELEASE_KERNEL} (mappings: literal ${JSON.stringify(OTHER_KERNEL)})`,
          }
        : {
            verificationStatus: 'True',
            verificationStage: 'Done',
            statusReason: `kernel module ${m.name.replace(/-\d+$/, '').replace(/-/g, '_')}.ko for ${RELEASE_KERNEL} found in quay.io/acme/${m.name}:${RELEASE_KERNEL}`,
          },
      now,
    ),
  );
  entries.sort((a, b) => (`${a.namespace}/${a.name}` < `${b.namespace}/${b.name}` ? -1 : 1));
  return summarizeStatus(undefined, { modules: entries, generation, kernelVersion: RELEASE_KERNEL }, now);
}

interface StatusWrite {
  readonly name: string;
  readonly releaseImage: string;
  readonly verified: number;
  readonly bodyBytes: number;
  readonly ms: number;
}

async function createValidation(server: TestServer, name: string, releaseImage: string, modules: readonly ModuleRef[], failingFails: boolean): Promise<StatusWrite> {
  const json = { 'content-type': 'application/json' };
  const created = await server.request('POST', PFVO, {
    body: JSON.stringify({ apiVersion: API_VERSION, kind: 'PreflightValidationOCP', metadata: { name }, spec: { releaseImage } }),
    headers: json,
  });
  if (created.status !== 201) throw new Error(`creating PreflightValidationOCP ${name}: HTTP ${created.status}: ${created.body.slice(0, 500)}`);
  const obj = created.json<{ metadata: { generation?: number } }>();
  const status = finishedStatus(modules, failingFails, obj.metadata.generation ?? 1);
  const body = JSON.stringify({ ...obj, status });
  const start = performance.now();
  const put = await server.request('PUT', `${PFVO}/${name}/status`, { body, headers: json });
  const ms = performance.now() - start;
  if (put.status !== 200) throw new Error(`writing the status of ${name}: HTTP ${put.status}: ${put.body.slice(0, 500)}`);
  return { name, releaseImage, verified: status.counts?.verified ?? 0, bodyBytes: Buffer.byteLength(body), ms: round(ms, 1) };
}

type Json = Record<string, any>;

/** AdmissionReview bodies of the recorded update with `image`, each with its own uid. */
function reviewBodies(fixture: Json, image: string, version: string): string[] {
  return Array.from({ length: BODIES }, (_, i) => {
    const review = structuredClone(fixture);
    review['request']['uid'] = `705ab4f5-6393-11e8-b7cc-${(0x42010a800000 + i).toString(16)}`;
    review['request']['object']['spec']['desiredUpdate'] = { ...review['request']['object']['spec']['desiredUpdate'], image, version };
    return JSON.stringify(review);
  });
}

interface Decision {
  readonly allowed: boolean;
  readonly message?: string;
  readonly auditAnnotations?: Readonly<Record<string, string>>;
  readonly responseBytes: number;
}

async function decide(server: TestServer, body: string): Promise<Decision> {
  const r = await server.request('POST', WEBHOOK_URL_PATH, { body, headers: { 'content-type': 'application/json', accept: 'application/json' }, anonymous: true });
  if (r.status !== 200) throw new Error(`the webhook answered HTTP ${r.status}: ${r.body.slice(0, 500)}`);
  const res = r.json<{ response: { allowed: boolean; status?: { message?: string }; auditAnnotations?: Record<string, string> } }>().response;
  return {
    allowed: res.allowed,
    ...(res.status?.message !== undefined ? { message: res.status.message } : {}),
    ...(res.auditAnnotations ? { auditAnnotations: res.auditAnnotations } : {}),
    responseBytes: Buffer.byteLength(r.body),
  };
}

// ---- Load ------------------------------------------------------------------------------------

interface Case {
  readonly name: 'allow' | 'deny' | 'both';
  readonly bodies: readonly string[];
  /** Undefined: the decisions are not checked. */
  readonly expectAllowed?: boolean;
}

type Generator = 'autocannon' | 'paced';

interface LoadRun {
  readonly case: Case['name'];
  readonly generator: Generator;
  readonly seconds: number;
  /** Requests written to the connections. */
  readonly sent: number;
  readonly responses: number;
  readonly non2xx: number;
  /** Connection errors (timeouts not included). */
  readonly errors: number;
  readonly timeouts: number;
  /** 200 responses whose decision was not the expected one. */
  readonly wrongDecisions: number;
  /** Responses per second over the run. */
  readonly rate: number;
  /** Every response on a connection that was already open. */
  readonly latency: Summary;
  /** Responses that opened their connection (TCP and TLS setup included), and the slowest of them. */
  readonly connectionSetups: { readonly n: number; readonly maxMs: number };
  /** autocannon: median over whole seconds of the time from a second's first response to its last. */
  readonly burstMs: number | null;
  /** paced: how late requests were sent against their schedule (p99, max). */
  readonly sendLagMs: { readonly p99: number; readonly max: number } | null;
  readonly cpu: CpuUse;
  readonly memory: Memory;
}

interface RawRun {
  readonly seconds: number;
  readonly sent: number;
  readonly statuses: ReadonlyMap<number, number>;
  readonly errors: number;
  readonly timeouts: number;
  readonly wrongDecisions: number;
  readonly latencies: readonly number[];
  readonly setups: readonly number[];
  /** Completion times (ms since the start) of the responses, for the burst length. */
  readonly doneAt: readonly number[];
  readonly sendLags: readonly number[];
}

/** Stops the generator in flight (on a signal). */
let stopLoad: (() => void) | undefined;

const expectedText = (c: Case) => (c.expectAllowed === undefined ? '' : c.expectAllowed ? '"allowed":true' : '"allowed":false');

/**
 * autocannon with `overallRate`: each connection may send rate/connections requests per second
 * and sends them back to back, one at a time, at the start of every second, then waits.
 */
function autocannonRun(server: TestServer, c: Case, seconds: number): Promise<RawRun> {
  return new Promise((resolve, reject) => {
    let sent = 0;
    const latencies: number[] = [];
    const setups: number[] = [];
    const doneAt: number[] = [];
    const statuses = new Map<number, number>();
    const answered = new WeakSet<object>();
    const expected = expectedText(c);
    const start = performance.now();
    const instance = autocannon(
      {
        url: `https://127.0.0.1:${server.port}${WEBHOOK_URL_PATH}`,
        connections: PLAN.connections,
        overallRate: PLAN.rate,
        duration: seconds,
        timeout: 10,
        method: 'POST',
        headers: { 'content-type': 'application/json', accept: 'application/json, */*' },
        requests: c.bodies.map((body) => ({ body })),
        setupClient: (client) => void client.on('request', () => sent++),
        verifyBody: (body) => body.includes(expected),
        ignoreCoordinatedOmission: true,
      },
      (err, result) => {
        stopLoad = undefined;
        if (err) reject(err);
        else {
          resolve({
            seconds: (performance.now() - start) / 1000,
            sent,
            statuses,
            errors: result.errors - result.timeouts,
            timeouts: result.timeouts,
            wrongDecisions: result.mismatches,
            latencies,
            setups,
            doneAt,
            sendLags: [],
          });
        }
      },
    );
    stopLoad = () => instance.stop();
    instance.on('response', (client: object, status: number, _bytes: number, ms: number) => {
      doneAt.push(performance.now() - start);
      statuses.set(status, (statuses.get(status) ?? 0) + 1);
      if (answered.has(client)) latencies.push(ms);
      else {
        answered.add(client);
        setups.push(ms);
      }
    });
  });
}

/**
 * Open loop at a steady rate, as independent callers would arrive: request i is started at
 * start + i/rate whether or not earlier ones have been answered, on a keep-alive pool of
 * `connections` sockets (the agent reuses an idle socket first, as Go's http.Transport in
 * kube-apiserver does). Latency runs from starting the request (waiting for a socket included)
 * to the end of its response. Timers fire up to a millisecond late: what is due is sent at once,
 * and the lateness is reported as the send lag.
 */
function pacedRun(server: TestServer, agent: Agent, sockets: WeakSet<object>, ca: Buffer, c: Case, seconds: number): Promise<RawRun> {
  return new Promise((resolve) => {
    const latencies: number[] = [];
    const setups: number[] = [];
    const sendLags: number[] = [];
    const statuses = new Map<number, number>();
    const expected = expectedText(c);
    const interval = 1000 / PLAN.rate;
    const total = Math.round(seconds * PLAN.rate);
    let sent = 0;
    let settled = 0;
    let errors = 0;
    let timeouts = 0;
    let wrongDecisions = 0;
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    const start = performance.now();
    const finish = () => {
      stopLoad = undefined;
      resolve({ seconds: (performance.now() - start) / 1000, sent, statuses, errors, timeouts, wrongDecisions, latencies, setups, doneAt: [], sendLags });
    };
    const settle = () => {
      if (++settled === sent && (stopped || sent === total)) finish();
    };
    const send = (i: number) => {
      const t0 = performance.now();
      let done = false;
      const end = () => {
        if (done) return;
        done = true;
        settle();
      };
      sendLags.push(t0 - (start + i * interval));
      const body = c.bodies[i % c.bodies.length]!;
      let reused = true;
      const req = httpsRequest(
        {
          host: '127.0.0.1',
          port: server.port,
          method: 'POST',
          path: WEBHOOK_URL_PATH,
          agent,
          ca,
          headers: { 'content-type': 'application/json', accept: 'application/json, */*', 'content-length': String(Buffer.byteLength(body)) },
          timeout: 10_000,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (b: Buffer) => chunks.push(b));
          res.on('end', () => {
            const ms = performance.now() - t0;
            const status = res.statusCode ?? 0;
            statuses.set(status, (statuses.get(status) ?? 0) + 1);
            if (status === 200 && !Buffer.concat(chunks).toString('utf8').includes(expected)) wrongDecisions++;
            (reused ? latencies : setups).push(ms);
            end();
          });
          res.on('error', () => {
            if (!done) errors++;
            end();
          });
        },
      );
      req.on('socket', (socket) => {
        if (!sockets.has(socket)) {
          sockets.add(socket);
          reused = false;
        }
      });
      req.on('timeout', () => {
        timeouts++;
        req.destroy(new Error('timed out'));
      });
      req.on('error', (err) => {
        if (!done && err.message !== 'timed out') errors++;
        end();
      });
      req.end(body);
    };
    const tick = () => {
      const due = Math.min(total, Math.floor((performance.now() - start) / interval) + 1);
      while (sent < due && !stopped) send(sent++);
      if (sent < total && !stopped) timer = setTimeout(tick, Math.max(0, start + sent * interval - performance.now()));
    };
    stopLoad = () => {
      stopped = true;
      if (timer) clearTimeout(timer);
      if (settled === sent) finish();
    };
    tick();
  });
}

async function runCase(server: TestServer, pid: number | undefined, c: Case, generator: Generator, ca: Buffer): Promise<LoadRun> {
  const agent = new Agent({ keepAlive: true, maxSockets: PLAN.connections });
  const sockets = new WeakSet<object>();
  try {
    const run = (seconds: number) => (generator === 'autocannon' ? autocannonRun(server, c, seconds) : pacedRun(server, agent, sockets, ca, c, seconds));
    checkDeadline(`the ${c.name} case`);
    progress(`${c.name}, ${generator}: warm-up, ${PLAN.warmupSeconds} s at ${PLAN.rate}/s`);
    const warm = await run(PLAN.warmupSeconds);
    const warmBad = [...warm.statuses].filter(([s]) => s !== 200).reduce((a, [, n]) => a + n, 0);
    if (warmBad + warm.errors + warm.timeouts + warm.wrongDecisions > 0) {
      throw new Error(`${c.name}, ${generator}, warm-up: ${warmBad} responses other than 200, ${warm.errors} errors, ${warm.timeouts} timeouts, ${warm.wrongDecisions} wrong decisions`);
    }
    checkDeadline(`the ${c.name} case`);
    progress(`${c.name}, ${generator}: ${PLAN.seconds} s at ${PLAN.rate}/s, at most ${PLAN.connections} connections`);
    const mark = cpuMark(pid);
    const raw = await run(PLAN.seconds);
    const cpu = cpuSince(mark, pid);
    const responses = [...raw.statuses.values()].reduce((a, n) => a + n, 0);
    const lag = summarize(raw.sendLags);
    const result: LoadRun = {
      case: c.name,
      generator,
      seconds: round(raw.seconds),
      sent: raw.sent,
      responses,
      non2xx: [...raw.statuses].filter(([s]) => s < 200 || s > 299).reduce((a, [, n]) => a + n, 0),
      errors: raw.errors,
      timeouts: raw.timeouts,
      wrongDecisions: raw.wrongDecisions,
      rate: round(responses / raw.seconds, 1),
      latency: summarize(raw.latencies),
      connectionSetups: { n: raw.setups.length, maxMs: raw.setups.length > 0 ? round(Math.max(...raw.setups)) : 0 },
      burstMs: generator === 'autocannon' ? burstMedian(raw.doneAt) : null,
      sendLagMs: generator === 'paced' ? { p99: lag.p99, max: lag.max } : null,
      cpu,
      memory: memoryOf(pid),
    };
    progress(`${c.name}, ${generator}: ${result.responses} responses, ${result.rate}/s, p50 ${result.latency.p50} ms, p99 ${result.latency.p99} ms, max ${result.latency.max} ms`);
    return result;
  } finally {
    agent.destroy();
  }
}

/** Median over the whole seconds of a run of the time from the second's first response to its last. */
function burstMedian(doneAt: readonly number[]): number | null {
  const seconds = new Map<number, { first: number; last: number }>();
  for (const t of doneAt) {
    const k = Math.floor(t / 1000);
    const s = seconds.get(k);
    if (!s) seconds.set(k, { first: t, last: t });
    else s.last = Math.max(s.last, t);
  }
  const whole = [...seconds].filter(([k]) => k < Math.floor(PLAN.seconds)).map(([, s]) => s.last - s.first);
  return whole.length > 0 ? summarize(whole).p50 : null;
}

// ---- Report ----------------------------------------------------------------------------------

interface Goal {
  readonly goal: string;
  readonly limitMs: number;
  readonly valueMs: number;
  readonly met: boolean;
}

interface Setup {
  readonly modules: number;
  readonly moduleFiles: number;
  readonly moduleYamlBytes: number;
  readonly validations: readonly StatusWrite[];
  /** From the restart with the controller to both decisions as expected. */
  readonly readyMs: number;
  /** The AdmissionReview body of each case (one of BODIES with their own uid). */
  readonly requestBytes: number;
  readonly decisions: { readonly allow: Decision; readonly deny: Decision };
}

interface Report {
  readonly date: string;
  readonly command: string;
  readonly mode: 'full' | 'quick';
  readonly node: string;
  readonly autocannon: string;
  readonly cpus: number;
  readonly cpuModel: string;
  /** 1-minute load average at the start and at the end of the run. */
  readonly loadAverage: { readonly start: number; readonly end: number };
  readonly plan: Plan;
  readonly serverPid: number | null;
  readonly setup?: Setup;
  readonly afterSetup?: Memory;
  readonly runs: readonly LoadRun[];
  readonly goals: readonly Goal[];
  readonly totalSeconds: number;
  readonly error?: string;
}

const padEnd = (s: string | number, n: number) => String(s).padEnd(n);
const num = (x: number) => (Number.isNaN(x) ? 'n/a' : x.toFixed(1));
const mib = (kib: number | null) => (kib === null ? 'n/a' : `${(kib / 1024).toFixed(0)} MiB`);
const sec = (x: number | null) => (x === null ? 'n/a' : `${x.toFixed(2)} s`);
const bytes = (b: number) => (b >= 1024 * 1024 ? `${(b / 1024 / 1024).toFixed(2)} MiB` : b >= 1024 ? `${(b / 1024).toFixed(1)} KiB` : `${b} B`);

function formatReport(r: Report): string {
  const out: string[] = [];
  out.push(`kmm-preflight upgrade gate benchmark (${r.mode}), ${r.date}`);
  out.push(`node ${r.node}, autocannon ${r.autocannon}, ${r.cpus} CPUs (${r.cpuModel}), server pid ${r.serverPid ?? 'n/a'}; client and server share the machine`);
  out.push(`1-minute load average: ${r.loadAverage.start.toFixed(2)} at the start, ${r.loadAverage.end.toFixed(2)} at the end`);
  out.push(`command: ${r.command}`);
  const s = r.setup;
  if (s) {
    out.push(`setup: ${s.modules} Modules in ${s.moduleFiles} files (${bytes(s.moduleYamlBytes)} of YAML) in --modules-dir`);
    for (const v of s.validations) {
      out.push(`  PreflightValidationOCP ${v.name}: ${v.verified} of ${s.modules} Modules verified, release ${v.releaseImage} (status PUT of ${bytes(v.bodyBytes)} in ${num(v.ms)} ms)`);
    }
    out.push(`  server restarted with its controller: both decisions as expected ${num(s.readyMs)} ms after the restart; then ${r.plan.settleSeconds} s of load of both cases, not measured`);
    const d = s.decisions;
    out.push(`  allow: allowed, ${bytes(d.allow.responseBytes)} response (audit: ${Object.entries(d.allow.auditAnnotations ?? {}).map(([k, v]) => `${k}=${v}`).join(', ')})`);
    out.push(`  deny: refused, ${bytes(d.deny.responseBytes)} response, ${Buffer.byteLength(d.deny.message ?? '')}-byte message: ${d.deny.message ?? ''}`);
  }
  if (r.afterSetup) out.push(`after setup: server VmRSS ${mib(r.afterSetup.vmRssKiB)}, VmHWM ${mib(r.afterSetup.vmHwmKiB)}`);
  if (r.runs.length > 0 && s) {
    out.push('');
    out.push(
      `AdmissionReview decisions: POST ${WEBHOOK_URL_PATH} over loopback HTTPS without a client certificate (as kube-apiserver calls it), ${bytes(s.requestBytes)} AdmissionReview (the recorded ClusterVersion update), ${r.plan.rate} requests/s for ${r.plan.seconds} s after ${r.plan.warmupSeconds} s of warm-up, at most ${r.plan.connections} keep-alive connections`,
    );
    out.push(`   autocannon: overallRate ${r.plan.rate}, ${r.plan.connections} connections, each sending its ${r.plan.rate / r.plan.connections} requests of every second back to back (bursts of ${r.plan.connections} concurrent requests)`);
    out.push(`   paced: one request every ${num(1000 / r.plan.rate)} ms whether or not earlier ones are answered (open loop), on a keep-alive pool of ${r.plan.connections} sockets`);
    out.push(
      `   ${padEnd('case', 6)}${padEnd('generator', 11)}${pad('sent', 6)}${pad('responses', 10)}${pad('non-2xx', 8)}${pad('errors', 7)}${pad('rate/s', 7)}${pad('p50 ms', 8)}${pad('p90 ms', 8)}${pad('p99 ms', 8)}${pad('max ms', 8)}${pad('server CPU', 11)}${pad('µs/req', 7)}`,
    );
    for (const x of r.runs) {
      const perReq = x.cpu.serverSeconds === null ? 'n/a' : String(Math.round((x.cpu.serverSeconds * 1e6) / Math.max(1, x.responses)));
      out.push(
        `   ${padEnd(x.case, 6)}${padEnd(x.generator, 11)}${pad(x.sent, 6)}${pad(x.responses, 10)}${pad(x.non2xx, 8)}${pad(x.errors + x.timeouts, 7)}${pad(x.rate.toFixed(1), 7)}${pad(num(x.latency.p50), 8)}${pad(num(x.latency.p90), 8)}${pad(num(x.latency.p99), 8)}${pad(num(x.latency.max), 8)}${pad(sec(x.cpu.serverSeconds), 11)}${pad(perReq, 7)}`,
      );
    }
    out.push(`   (latency: from starting a request to the end of its response, on a connection already open; "errors": connection errors and timeouts; "server CPU": the server process during the run)`);
    for (const x of r.runs) {
      const notes = [
        `${x.latency.n} latency samples`,
        x.connectionSetups.n > 1
          ? `${x.connectionSetups.n} responses that opened their connection (TCP and TLS included) left out, the slowest ${num(x.connectionSetups.maxMs)} ms`
          : x.connectionSetups.n === 1
            ? `1 response that opened its connection (TCP and TLS included) left out, ${num(x.connectionSetups.maxMs)} ms`
            : 'no connection opened during the run',
        x.sent > x.responses + x.errors + x.timeouts ? `${x.sent - x.responses - x.errors - x.timeouts} requests in flight when autocannon closed its connections at the end` : '',
        x.burstMs !== null ? `each second's responses came within ${num(x.burstMs)} ms (median)` : '',
        x.sendLagMs !== null ? `sent late against the schedule by at most ${num(x.sendLagMs.max)} ms (p99 ${num(x.sendLagMs.p99)} ms)` : '',
      ].filter(Boolean);
      out.push(`   ${x.case}, ${x.generator}: ${notes.join('; ')}`);
    }
    for (const g of r.goals) out.push(`  goal ${g.goal}: ${Number.isNaN(g.valueMs) ? 'n/a' : g.valueMs.toFixed(2)} ms -> ${g.met ? 'goal met' : 'goal missed'}`);
    for (const x of r.runs) {
      out.push(
        `  ${x.case}, ${x.generator}: server VmRSS ${mib(x.memory.vmRssKiB)}, VmHWM ${mib(x.memory.vmHwmKiB)}; CPU during the run (${x.cpu.wallSeconds.toFixed(1)} s wall, ${r.cpus} CPUs): server ${sec(x.cpu.serverSeconds)}, load generator ${sec(x.cpu.clientSeconds)}, other processes ${sec(x.cpu.otherSeconds)}`,
      );
    }
  }
  out.push('');
  if (r.error) out.push(`ERROR: ${r.error}`);
  out.push(`total ${r.totalSeconds.toFixed(1)} s`);
  return out.join('\n') + '\n';
}

// ---- Main ------------------------------------------------------------------------------------

/** Runs `fn` with environment variables set (undefined: removed) for the children it starts. */
async function withEnv<T>(env: Readonly<Record<string, string | undefined>>, fn: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  const set = (vars: Readonly<Record<string, string | undefined>>) => {
    for (const [k, v] of Object.entries(vars)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  };
  set(env);
  try {
    return await fn();
  } finally {
    set(saved);
  }
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    checkDeadline(what);
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
    await sleep(200);
  }
}

async function main(): Promise<number> {
  const t0 = Date.now();
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  const command = ['node', 'bench/gate.ts', ...process.argv.slice(2)].map(quote).join(' ');
  const loadStart = loadavg()[0] ?? 0;
  const runs: LoadRun[] = [];
  const goals: Goal[] = [];
  let server: TestServer | undefined;
  let dir: string | undefined;
  let pid: number | undefined;
  let setup: Setup | undefined;
  let afterSetup: Memory | undefined;
  let error: string | undefined;

  let cleaning: Promise<void> | undefined;
  const cleanUp = () =>
    (cleaning ??= (async () => {
      stopLoad?.();
      await server?.stop().catch((e: unknown) => progress(`stopping the server failed: ${String(e)}`));
      if (dir) await rm(dir, { recursive: true, force: true });
    })());
  // A hard stop in case something hangs outside the bounded steps (the server is still stopped).
  const watchdog = setTimeout(() => {
    progress(`the run exceeded ${PLAN.totalLimitMs / 1000} s; stopping`);
    void cleanUp().finally(() => process.exit(1));
  }, PLAN.totalLimitMs + 30_000);
  watchdog.unref();
  // Ctrl-C or kill: the load stops now and the run ends at its next check; exit anyway (the
  // server stopped) if that does not happen within 10 s.
  const onSignal = (sig: NodeJS.Signals) => {
    stopRequested = sig;
    progress(`${sig}: stopping`);
    stopLoad?.();
    setTimeout(() => void cleanUp().finally(() => process.exit(130)), 10_000).unref();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-bench-gate-'));
    const modules = moduleRefs();
    const modulesDir = join(dir, 'modules');
    const moduleYamlBytes = await writeModules(modulesDir, modules);
    progress(`wrote ${modules.length} Modules (${bytes(moduleYamlBytes)}) to ${modulesDir}`);

    const fixture = JSON.parse(readFileSync(FIXTURE, 'utf8')) as Json;
    const allowImage = fixture['request']['object']['spec']['desiredUpdate']['image'] as string;
    const serverArgs = ['--modules-dir', modulesDir, '--builder', 'none'];
    const nodeOptions = args['server-node-options'];

    progress('starting the server without its controller, to write the validations');
    server = await withEnv({ KMM_PREFLIGHT_CONTROLLER: 'false' }, () => startTestServer(serverArgs));
    const validations = [
      await createValidation(server, 'bench-allow', allowImage, modules, false),
      await createValidation(server, 'bench-deny', DENY_IMAGE, modules, true),
    ];
    for (const v of validations) progress(`${v.name}: status of ${bytes(v.bodyBytes)} written in ${v.ms} ms`);

    progress('restarting the server with its controller');
    await server.kill('SIGTERM');
    checkDeadline('the restart');
    const restarted = performance.now();
    await withEnv({ KMM_PREFLIGHT_CONTROLLER: undefined, ...(nodeOptions !== undefined ? { NODE_OPTIONS: nodeOptions } : {}) }, () => server!.restart());
    pid = findServerPid(server);
    if (pid === undefined) progress('warning: could not find the server pid; CPU and memory are reported as n/a');

    const cases: readonly Case[] = [
      { name: 'allow', bodies: reviewBodies(fixture, allowImage, '4.16.2'), expectAllowed: true },
      { name: 'deny', bodies: reviewBodies(fixture, DENY_IMAGE, '4.16.3'), expectAllowed: false },
    ];
    const [allowCase, denyCase] = cases as [Case, Case];
    const s = server;
    const failingText = `${PLAN.failing} of ${PLAN.modules} Modules not verified`;
    const allow = await until('the gate to allow the verified release', PLAN.readyTimeoutMs, async () => {
      const d = await decide(s, allowCase.bodies[0]!);
      return d.allowed ? d : undefined;
    });
    const deny = await until(`the gate to refuse the other release with "${failingText}"`, PLAN.readyTimeoutMs, async () => {
      const d = await decide(s, denyCase.bodies[0]!);
      return !d.allowed && d.message?.includes(failingText) ? d : undefined;
    });
    const readyMs = round(performance.now() - restarted, 1);
    // After a restart the controller checks its False verdicts again (it does not know their
    // Modules' fingerprints): wait until its status write is done, so the runs see a quiet server.
    let last = '';
    let stableSince = performance.now();
    await until('the controller to finish', PLAN.readyTimeoutMs, async () => {
      const r = await s.request('GET', `${PFVO}/bench-deny`);
      const rv = r.json<{ metadata: { resourceVersion: string } }>().metadata.resourceVersion;
      if (rv !== last) {
        last = rv;
        stableSince = performance.now();
      }
      return performance.now() - stableSince > 1_000 ? true : undefined;
    });
    setup = { modules: modules.length, moduleFiles: MODULE_FILES, moduleYamlBytes, validations, readyMs, requestBytes: Buffer.byteLength(allowCase.bodies[0]!), decisions: { allow, deny } };
    afterSetup = memoryOf(pid);

    // The first seconds of load after a start also collect the start's garbage (the parsed
    // manifests, the status writes): V8's incremental marking then takes 10-20 ms steps.
    progress(`settling: ${PLAN.settleSeconds} s at ${PLAN.rate}/s, both cases (not measured)`);
    const both: Case = { name: 'both', bodies: allowCase.bodies.flatMap((b, i) => [b, denyCase.bodies[i]!]) };
    const settled = await autocannonRun(server, both, PLAN.settleSeconds);
    const settleBad = [...settled.statuses].filter(([code]) => code !== 200).reduce((a, [, n]) => a + n, 0);
    if (settleBad + settled.errors + settled.timeouts > 0) throw new Error(`settling load: ${settleBad} responses other than 200, ${settled.errors} errors, ${settled.timeouts} timeouts`);

    const ca = readFileSync(join(server.certDir, 'ca.crt'));
    for (const c of cases) {
      for (const generator of ['autocannon', 'paced'] as const) {
        const run = await runCase(server, pid, c, generator, ca);
        runs.push(run);
        const goal = `p99 < ${GOAL_P99_MS} ms at ${PLAN.rate} requests/s (${c.name}, ${generator})`;
        goals.push({ goal, limitMs: GOAL_P99_MS, valueMs: run.latency.p99, met: run.latency.p99 < GOAL_P99_MS });
        const problems = [
          run.non2xx > 0 ? `${run.non2xx} responses other than 2xx` : '',
          run.errors > 0 ? `${run.errors} connection errors` : '',
          run.timeouts > 0 ? `${run.timeouts} timeouts` : '',
          run.wrongDecisions > 0 ? `${run.wrongDecisions} responses with a decision other than ${c.expectAllowed ? 'allowed' : 'refused'}` : '',
        ].filter(Boolean);
        if (problems.length > 0) throw new Error(`${c.name}, ${generator}: ${problems.join(', ')}`);
      }
    }
  } catch (err) {
    error = err instanceof Error ? err.message : String(err);
    if (stopRequested && !error.startsWith('interrupted')) error = `interrupted by ${stopRequested} (${error})`;
    progress(`error: ${error}`);
    if (server && !stopRequested) progress(`server output (tail):\n${server.output().slice(-2000)}`);
  } finally {
    progress('stopping the server');
    await cleanUp();
    clearTimeout(watchdog);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }

  const report: Report = {
    date: new Date().toISOString(),
    command,
    mode: PLAN.mode,
    node: process.version,
    autocannon: AUTOCANNON_VERSION,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    loadAverage: { start: round(loadStart), end: round(loadavg()[0] ?? 0) },
    plan: PLAN,
    serverPid: pid ?? null,
    ...(setup ? { setup } : {}),
    ...(afterSetup ? { afterSetup } : {}),
    runs,
    goals,
    totalSeconds: round((Date.now() - t0) / 1000, 1),
    ...(error !== undefined ? { error } : {}),
  };
  process.stdout.write(args.json ? `${JSON.stringify(report, (_k, v: unknown) => (typeof v === 'number' && Number.isNaN(v) ? null : v), 2)}\n` : formatReport(report));
  return stopRequested ? 130 : error === undefined ? 0 : 1;
}

process.exitCode = await main();
