/**
 * API benchmark of kmm-preflight against the real server (`src/main.ts` as a child process, the
 * same one the e2e tests start), over loopback TLS with the admin client certificate.
 *
 *   node bench/api.ts             full run (about a minute on 2 cores)
 *   node bench/api.ts --quick     smoke run for CI (10-20 s)
 *   node bench/api.ts --json      machine-readable JSON on stdout instead of the tables
 *   node bench/api.ts --phases=get,watch,create   only some phases (default: all three)
 *   node bench/api.ts --server-node-options="--cpu-prof --cpu-prof-dir=/tmp/kmm-prof"
 *                                 NODE_OPTIONS for the server child only (profiling; note the `=`)
 *
 * Phases: (1) GET of one object with 10,000 module statuses, as JSON and as kubectl's Table;
 * (2) latency from a status PATCH to the MODIFIED event at 100 concurrent watchers, for a small
 * object and for the 10,000-module one; (3) creates per second with 1 and 16 concurrent clients.
 * The server's VmRSS/VmHWM and CPU time are read from /proc after each phase.
 *
 * Exits non-zero only on an error (a request failed, a watcher missed its event for 10 s, the
 * run overran its time limit); a missed goal is reported, not failed. See bench/README.md.
 */
import { benchCommandLine, clockTicks, findServerPid, pad, progress, round } from './lib.ts';
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { Agent, request as httpsRequest } from 'node:https';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { startTestServer, type TestServer } from '../test/helpers/server.ts';

const BASE = '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations';
const API_VERSION = 'kmm.sigs.x-k8s.io/v1beta2';
const TABLE_ACCEPT = 'application/json;as=Table;v=v1;g=meta.k8s.io,application/json';
const KERNEL = '6.1.0-18-amd64';
const REQUEST_TIMEOUT_MS = 30_000;
const WATCH_EVENT_TIMEOUT_MS = 10_000;
const GOAL_GET_P50_MS = 50;
const GOAL_WATCH_P99_MS = 100;

// ---- Options ---------------------------------------------------------------------------------

const USAGE = 'usage: node bench/api.ts [--quick] [--json] [--phases=get,watch,create] [--server-node-options="<NODE_OPTIONS of the server>"]\n';
const PHASES = ['get', 'watch', 'create'] as const;
type Phase = (typeof PHASES)[number];

const args = benchCommandLine('bench/api.ts', USAGE, {
  phases: { type: 'string', default: PHASES.join(',') },
  'server-node-options': { type: 'string' },
}, (values) => {
  const phases = new Set<Phase>();
  for (const p of values.phases.split(',').map((x) => x.trim()).filter(Boolean)) {
    if (!(PHASES as readonly string[]).includes(p)) throw new Error(`unknown phase "${p}": expected some of ${PHASES.join(',')}`);
    phases.add(p as Phase);
  }
  return { ...values, phases };
});

interface Plan {
  readonly mode: 'full' | 'quick';
  readonly modules: number;
  readonly getWarmup: number;
  readonly getN: number;
  readonly watchers: number;
  readonly watchWarmupRounds: number;
  readonly smallRounds: number;
  readonly bigRounds: number;
  readonly createSeconds: number;
  readonly createClients: readonly number[];
  /** Upper bound of creates per client and run, whatever the duration. */
  readonly createMaxPerClient: number;
  /** The whole run is aborted (exit 1) past this. */
  readonly totalLimitMs: number;
}

const PLAN: Plan = args.quick
  ? {
      mode: 'quick',
      modules: 10_000,
      getWarmup: 5,
      getN: 30,
      watchers: 20,
      watchWarmupRounds: 1,
      smallRounds: 5,
      bigRounds: 2,
      createSeconds: 1,
      createClients: [1, 16],
      createMaxPerClient: 5_000,
      totalLimitMs: 120_000,
    }
  : {
      mode: 'full',
      modules: 10_000,
      getWarmup: 20,
      getN: 200,
      watchers: 100,
      watchWarmupRounds: 2,
      smallRounds: 20,
      bigRounds: 5,
      createSeconds: 5,
      createClients: [1, 16],
      createMaxPerClient: 50_000,
      totalLimitMs: 15 * 60_000,
    };

const runDeadline = Date.now() + PLAN.totalLimitMs;
function checkDeadline(what: string): void {
  if (Date.now() > runDeadline) throw new Error(`the benchmark overran its ${PLAN.totalLimitMs / 1000} s limit during ${what}`);
}


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
  const s = [...samples].sort((a, b) => a - b);
  const at = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
  return {
    n: s.length,
    p50: round(at(50)),
    p90: round(at(90)),
    p99: round(at(99)),
    max: round(s[s.length - 1]!),
    mean: round(s.reduce((a, b) => a + b, 0) / s.length),
  };
}


// ---- HTTP ------------------------------------------------------------------------------------

interface Tls {
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
}

interface Response {
  readonly status: number;
  readonly body: Buffer;
  /** From just before the request was sent to the end of the response body. */
  readonly ms: number;
  /** Whether the request went out on a connection this agent had not used before. */
  readonly newConnection: boolean;
}

class Client {
  readonly agent: Agent;
  readonly #seen = new WeakSet<object>();
  connections = 0;

  readonly server: TestServer;
  readonly tls: Tls;

  constructor(server: TestServer, tls: Tls, maxSockets: number) {
    this.server = server;
    this.tls = tls;
    this.agent = new Agent({ keepAlive: true, maxSockets, ...tls });
  }

  request(method: string, path: string, o: { body?: string; headers?: Record<string, string> } = {}): Promise<Response> {
    return new Promise((resolve, reject) => {
      let newConnection = false;
      const headers: Record<string, string> = { ...(o.headers ?? {}) };
      if (o.body !== undefined) headers['content-length'] = String(Buffer.byteLength(o.body));
      const start = performance.now();
      const req = httpsRequest(
        { host: '127.0.0.1', port: this.server.port, method, path, agent: this.agent, headers, ...this.tls },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            const ms = performance.now() - start;
            resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks), ms, newConnection });
          });
          res.on('error', reject);
        },
      );
      req.on('socket', (s) => {
        if (!this.#seen.has(s)) {
          this.#seen.add(s);
          this.connections++;
          newConnection = true;
        }
      });
      req.setTimeout(REQUEST_TIMEOUT_MS, () => req.destroy(new Error(`${method} ${path} timed out after ${REQUEST_TIMEOUT_MS} ms`)));
      req.on('error', reject);
      if (o.body !== undefined) req.write(o.body);
      req.end();
    });
  }

  close(): void {
    this.agent.destroy();
  }
}

async function expectStatus(p: Promise<Response>, status: number, what: string): Promise<Response> {
  const r = await p;
  if (r.status !== status) throw new Error(`${what}: expected HTTP ${status}, got ${r.status}: ${r.body.toString('utf8').slice(0, 400)}`);
  return r;
}

const RV_NEEDLE = Buffer.from('"resourceVersion":"');

/**
 * The object's resourceVersion from its JSON without parsing megabytes: this server writes
 * `metadata.resourceVersion` once per object and the benchmark's data never contains that key.
 */
function resourceVersionOf(json: Buffer, from = 0): string | undefined {
  const i = json.indexOf(RV_NEEDLE, from);
  if (i < 0) return undefined;
  const start = i + RV_NEEDLE.length;
  const end = json.indexOf(0x22, start);
  return end < 0 ? undefined : json.toString('latin1', start, end);
}

// ---- Server process --------------------------------------------------------------------------



interface ProcSample {
  readonly after: string;
  /** Wall-clock seconds since the previous sample (the phase's duration). */
  readonly wallSeconds: number;
  /** KiB, or null when /proc could not be read. */
  readonly vmRssKiB: number | null;
  readonly vmHwmKiB: number | null;
  /** Server CPU seconds (user + system) since the previous sample. */
  readonly cpuSeconds: number | null;
  /** CPU seconds of this benchmark process (the clients) since the previous sample. */
  readonly clientCpuSeconds: number;
  /**
   * CPU seconds that other processes used since the previous sample (user + system time of all
   * CPUs from /proc/stat minus server and clients): other work competing for the same cores.
   */
  readonly otherCpuSeconds: number | null;
  /** CPU seconds in interrupts and softirqs (loopback TCP is mostly here), all CPUs. */
  readonly irqCpuSeconds: number | null;
  /** CPU seconds stolen by the hypervisor, all CPUs. */
  readonly stealCpuSeconds: number | null;
}

interface MachineTicks {
  readonly process: number;
  readonly irq: number;
  readonly steal: number;
}

/** CPU time of the whole machine in clock ticks, from the first line of /proc/stat. */
function machineTicks(): MachineTicks | undefined {
  try {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = f;
    return { process: user + nice + system, irq: irq + softirq, steal };
  } catch {
    return undefined;
  }
}
let lastMachine = machineTicks();

let lastClientCpu = process.cpuUsage();
function clientCpu(): number {
  const d = process.cpuUsage(lastClientCpu);
  lastClientCpu = process.cpuUsage();
  return round((d.user + d.system) / 1e6);
}

let lastCpuTicks: number | undefined;
let lastSampleAt = performance.now();
function sampleProcess(pid: number | undefined, after: string): ProcSample {
  const clientCpuSeconds = clientCpu();
  const nowMs = performance.now();
  const wallSeconds = round((nowMs - lastSampleAt) / 1000);
  lastSampleAt = nowMs;
  const machine = machineTicks();
  const prev = lastMachine;
  lastMachine = machine;
  const delta = (k: keyof MachineTicks) => (machine && prev ? round((machine[k] - prev[k]) / clockTicks) : null);
  const irqCpuSeconds = delta('irq');
  const stealCpuSeconds = delta('steal');
  const processSeconds = delta('process');
  if (pid === undefined) return { after, wallSeconds, vmRssKiB: null, vmHwmKiB: null, cpuSeconds: null, clientCpuSeconds, otherCpuSeconds: null, irqCpuSeconds, stealCpuSeconds };
  let vmRssKiB: number | null = null;
  let vmHwmKiB: number | null = null;
  let cpuSeconds: number | null = null;
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    vmRssKiB = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? NaN);
    vmHwmKiB = Number(/^VmHWM:\s+(\d+) kB/m.exec(status)?.[1] ?? NaN);
    if (Number.isNaN(vmRssKiB)) vmRssKiB = null;
    if (Number.isNaN(vmHwmKiB)) vmHwmKiB = null;
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[11]) + Number(fields[12]);
    if (Number.isFinite(ticks)) {
      cpuSeconds = lastCpuTicks === undefined ? ticks / clockTicks : (ticks - lastCpuTicks) / clockTicks;
      lastCpuTicks = ticks;
    }
  } catch {
    // the process is gone or /proc is not readable: n/a
  }
  const otherCpuSeconds = processSeconds !== null && cpuSeconds !== null ? round(Math.max(0, processSeconds - cpuSeconds - clientCpuSeconds)) : null;
  return { after, wallSeconds, vmRssKiB, vmHwmKiB, cpuSeconds: cpuSeconds === null ? null : round(cpuSeconds), clientCpuSeconds, otherCpuSeconds, irqCpuSeconds, stealCpuSeconds };
}

// ---- Test data -------------------------------------------------------------------------------

const NAMESPACES = ['kmm-operator-system', 'nvidia-gpu-operator', 'openshift-storage', 'mellanox-network', 'intel-qat', 'sriov-network'];
const DRIVERS = ['nvidia-gpu-driver', 'mlx5-ofed', 'intel-qat-driver', 'habana-gaudi', 'ptp-ice', 'lustre-client', 'nfs-ganesha-kmod', 'zfs-kmod'];

function moduleStatuses(count: number, now: string) {
  return Array.from({ length: count }, (_, i) => {
    const bucket = i % 50;
    const ns = `${NAMESPACES[i % NAMESPACES.length]!}-${Math.floor(i / 500)}`;
    const name = `${DRIVERS[i % DRIVERS.length]!}-${i}`;
    if (bucket < 45) {
      return { namespace: ns, name, verificationStatus: 'True', verificationStage: 'Done', statusReason: `verified: image quay.io/acme/${name}:${KERNEL} exists and is signed`, lastTransitionTime: now };
    }
    if (bucket < 48) {
      return { namespace: ns, name, verificationStatus: 'False', verificationStage: 'Requeued', statusReason: `image quay.io/acme/${name}:${KERNEL} not found and no build config for kernel ${KERNEL}`, lastTransitionTime: now };
    }
    if (bucket < 49) {
      return { namespace: ns, name, verificationStatus: 'Error', verificationStage: 'Build', statusReason: `build job ${name}-build-${(i * 7919) % 100000} failed: exit code 2 (see its pod logs)`, lastTransitionTime: now };
    }
    return { namespace: ns, name, verificationStatus: 'Unknown', verificationStage: 'Image', statusReason: 'waiting for the image check to run', lastTransitionTime: now };
  });
}

function statusOf(modules: ReturnType<typeof moduleStatuses>, message: string, now: string) {
  const count = (s: string) => modules.filter((m) => m.verificationStatus === s).length;
  return {
    kernelVersion: KERNEL,
    modules,
    counts: { total: modules.length, verified: count('True'), failed: count('False'), error: count('Error'), pending: count('Unknown') },
    conditions: [
      { type: 'Verified', status: 'False', reason: 'Verifying', message: 'not every Module is verified yet', lastTransitionTime: now },
      { type: 'Progressing', status: 'True', reason: 'Verifying', message, lastTransitionTime: now },
    ],
  };
}

const rfc3339 = () => new Date().toISOString().replace(/\.\d+Z$/, 'Z');
const createBody = (name: string, kernel = KERNEL) =>
  JSON.stringify({ apiVersion: API_VERSION, kind: 'PreflightValidation', metadata: { name, labels: { 'app.kubernetes.io/part-of': 'kmm-bench' } }, spec: { kernelVersion: kernel } });

/** A merge patch that changes only the Progressing condition (and so always makes a new revision). */
const smallStatusPatch = (message: string) =>
  JSON.stringify({
    status: {
      conditions: [
        { type: 'Verified', status: 'False', reason: 'Verifying', message: 'not every Module is verified yet', lastTransitionTime: rfc3339() },
        { type: 'Progressing', status: 'True', reason: 'Verifying', message, lastTransitionTime: rfc3339() },
      ],
    },
  });
const MERGE = { 'content-type': 'application/merge-patch+json' };
const JSON_CT = { 'content-type': 'application/json' };

// ---- Phase 1: GET of a 10,000-module object ---------------------------------------------------

interface StatusWrite {
  readonly bodyBytes: number;
  readonly ms: number;
}

/** Creates the big object and writes its 10,000-module status, as the durability test does. */
async function createBigObject(server: TestServer, tls: Tls, bigName: string): Promise<StatusWrite> {
  const client = new Client(server, tls, 1);
  try {
    await expectStatus(client.request('POST', BASE, { body: createBody(bigName), headers: JSON_CT }), 201, `create ${bigName}`);
    const now = rfc3339();
    const body = JSON.stringify({ status: statusOf(moduleStatuses(PLAN.modules, now), 'verifying 10,000 modules', now) });
    const write = await expectStatus(client.request('PATCH', `${BASE}/${bigName}/status`, { body, headers: MERGE }), 200, 'write the 10,000-module status');
    progress(`wrote the ${PLAN.modules}-module status (${Buffer.byteLength(body)} bytes) in ${write.ms.toFixed(0)} ms`);
    return { bodyBytes: Buffer.byteLength(body), ms: round(write.ms) };
  } finally {
    client.close();
  }
}

interface GetResult {
  readonly json: Summary & { readonly bytes: number; readonly connections: number };
  readonly table: Summary & { readonly bytes: number; readonly connections: number };
}

async function phaseGet(server: TestServer, tls: Tls, bigName: string): Promise<GetResult> {
  const client = new Client(server, tls, 1);
  try {
    const measure = async (accept: string, label: string) => {
      const c = new Client(server, tls, 1);
      try {
        const path = `${BASE}/${bigName}`;
        let bytes = 0;
        for (let i = 0; i < PLAN.getWarmup; i++) {
          checkDeadline(`GET warm-up (${label})`);
          bytes = (await expectStatus(c.request('GET', path, { headers: { accept } }), 200, `GET ${label}`)).body.length;
        }
        const samples: number[] = [];
        for (let i = 0; i < PLAN.getN; i++) {
          checkDeadline(`GET (${label})`);
          const r = await expectStatus(c.request('GET', path, { headers: { accept } }), 200, `GET ${label}`);
          if (r.newConnection && i > 0) progress(`warning: GET ${label} #${i} opened a new connection`);
          samples.push(r.ms);
          bytes = r.body.length;
        }
        return { ...summarize(samples), bytes, connections: c.connections };
      } finally {
        c.close();
      }
    };
    const json = await measure('application/json', 'application/json');
    // Sanity: the body really holds the 10,000 modules (parsed once, outside the timing).
    const check = await expectStatus(client.request('GET', `${BASE}/${bigName}`, { headers: { accept: 'application/json' } }), 200, 'GET check');
    const modules = (JSON.parse(check.body.toString('utf8')) as { status?: { modules?: unknown[] } }).status?.modules?.length;
    if (modules !== PLAN.modules) throw new Error(`GET returned ${String(modules)} modules, expected ${PLAN.modules}`);
    const table = await measure(TABLE_ACCEPT, 'Table');
    const t = JSON.parse((await client.request('GET', `${BASE}/${bigName}`, { headers: { accept: TABLE_ACCEPT } })).body.toString('utf8')) as { kind?: string };
    if (t.kind !== 'Table') throw new Error(`the Table Accept header got kind ${String(t.kind)}`);
    return { json, table };
  } finally {
    client.close();
  }
}

// ---- Phase 2: watch fan-out -------------------------------------------------------------------

/** One watch request on its own connection, recording when each MODIFIED event line arrived. */
class Watcher {
  /** resourceVersion -> performance.now() when the whole event line had arrived. */
  readonly arrivals = new Map<string, number>();
  readonly lineBytes = new Map<string, number>();
  headersAt: number | undefined;
  error: Error | undefined;
  ended = false;
  /** Kept for one watcher only, to verify the payload after a round. */
  keepLast = false;
  lastLine: Buffer | undefined;
  #pending: Buffer[] = [];
  #req: ReturnType<typeof httpsRequest> | undefined;
  #res: IncomingMessage | undefined;
  #onChange: (() => void) | undefined;

  start(server: TestServer, tls: Tls, rv: string): void {
    const path = `${BASE}?watch=true&resourceVersion=${rv}&timeoutSeconds=${Math.ceil(PLAN.totalLimitMs / 1000) + 60}`;
    // agent: false is a fresh connection per watcher, which is what 100 separate clients have.
    const req = httpsRequest({ host: '127.0.0.1', port: server.port, method: 'GET', path, agent: false, ...tls }, (res) => {
      this.#res = res;
      this.headersAt = performance.now();
      if (res.statusCode !== 200) this.fail(new Error(`watch answered HTTP ${res.statusCode}`));
      res.on('data', (chunk: Buffer) => this.#data(chunk));
      res.on('end', () => {
        this.ended = true;
        this.#notify();
      });
      res.on('error', (e) => this.fail(e));
    });
    req.on('error', (e) => this.fail(e));
    req.end();
    this.#req = req;
  }

  fail(e: Error): void {
    this.error ??= e;
    this.#notify();
  }

  #data(chunk: Buffer): void {
    const at = performance.now();
    let rest = chunk;
    for (;;) {
      const nl = rest.indexOf(0x0a);
      if (nl < 0) {
        if (rest.length > 0) this.#pending.push(rest);
        return;
      }
      const head = rest.subarray(0, nl);
      const line = this.#pending.length === 0 ? head : Buffer.concat([...this.#pending, head]);
      this.#pending = [];
      rest = rest.subarray(nl + 1);
      this.#line(line, at);
    }
  }

  #line(line: Buffer, at: number): void {
    // `{"type":"MODIFIED","object":{...}}`: the type is read from the prefix, the revision by a
    // byte search, so that the client does not parse megabytes 100 times over (it shares the CPUs).
    const prefix = line.toString('latin1', 0, 40);
    const type = /^\{"type":"([A-Z]+)"/.exec(prefix)?.[1];
    if (type === 'ERROR') {
      this.fail(new Error(`watch ERROR event: ${line.toString('utf8').slice(0, 400)}`));
      return;
    }
    if (type !== 'MODIFIED') return;
    const rv = resourceVersionOf(line);
    if (rv === undefined) return;
    this.arrivals.set(rv, at);
    this.lineBytes.set(rv, line.length + 1);
    if (this.keepLast) this.lastLine = Buffer.from(line);
    this.#notify();
  }

  #notify(): void {
    const f = this.#onChange;
    this.#onChange = undefined;
    f?.();
  }

  /** Resolves with the arrival time of revision `rv`; rejects on error, end of stream or after `timeoutMs`. */
  async waitFor(rv: string, until: number): Promise<number> {
    for (;;) {
      const at = this.arrivals.get(rv);
      if (at !== undefined) return at;
      if (this.error) throw this.error;
      if (this.ended) throw new Error(`the watch ended before revision ${rv} arrived`);
      const left = until - performance.now();
      if (left <= 0) throw new Error(`no MODIFIED event for revision ${rv} within ${WATCH_EVENT_TIMEOUT_MS} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#onChange = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  close(): void {
    this.#res?.destroy();
    this.#req?.destroy();
    this.fail(new Error('the watcher was closed'));
  }
}

interface WatchRun {
  readonly object: string;
  readonly modules: number;
  readonly watchers: number;
  readonly rounds: number;
  /** Delay from just before the PATCH was sent to each watcher having the event line, all rounds. */
  readonly delay: Summary;
  /** Per round, the slowest watcher. */
  readonly lastWatcher: Summary;
  /** The PATCH's own latency (to its full response). */
  readonly patch: Summary;
  readonly eventBytes: number;
}

async function watchRounds(
  client: Client,
  watchers: readonly Watcher[],
  name: string,
  modules: number,
  warmup: number,
  rounds: number,
  label: string,
): Promise<WatchRun> {
  const delays: number[] = [];
  const slowest: number[] = [];
  const patches: number[] = [];
  let eventBytes = 0;
  for (let r = -warmup; r < rounds; r++) {
    checkDeadline(`watch rounds (${label})`);
    await new Promise((resolve) => setTimeout(resolve, 50)); // let the previous fan-out settle
    const body = smallStatusPatch(`${label} round ${r} at ${Date.now()}`);
    const t0 = performance.now();
    const res = await expectStatus(client.request('PATCH', `${BASE}/${name}/status`, { body, headers: MERGE }), 200, `PATCH ${name}/status`);
    const rv = resourceVersionOf(res.body);
    if (rv === undefined) throw new Error(`the PATCH response of ${name} has no resourceVersion`);
    const until = t0 + WATCH_EVENT_TIMEOUT_MS;
    const arrivals = await Promise.all(
      watchers.map((w, i) => w.waitFor(rv, until).catch((e: Error) => {
        throw new Error(`watcher ${i} (${label}, round ${r}): ${e.message}`);
      })),
    );
    eventBytes = watchers[0]!.lineBytes.get(rv) ?? eventBytes;
    if (r < 0) continue; // warm-up rounds are not counted
    patches.push(res.ms);
    for (const at of arrivals) delays.push(at - t0);
    slowest.push(Math.max(...arrivals) - t0);
  }
  return {
    object: label,
    modules,
    watchers: watchers.length,
    rounds,
    delay: summarize(delays),
    lastWatcher: summarize(slowest),
    patch: summarize(patches),
    eventBytes,
  };
}

interface WatchResult {
  readonly watchers: number;
  /**
   * From starting the watches to the last watcher having its response headers (TLS handshake,
   * authentication, opening the watch).
   */
  readonly setupMs: number;
  /**
   * Whether every watcher had its headers before any event was sent, as kube-apiserver does. When
   * false, the server held the headers back until the first event (the warm-up PATCH).
   */
  readonly headersBeforeFirstEvent: boolean;
  readonly small: WatchRun;
  readonly big: WatchRun;
}

async function phaseWatch(server: TestServer, tls: Tls, smallName: string, bigName: string): Promise<WatchResult> {
  const client = new Client(server, tls, 1);
  const watchers: Watcher[] = [];
  try {
    await expectStatus(client.request('POST', BASE, { body: createBody(smallName), headers: JSON_CT }), 201, `create ${smallName}`);
    const now = rfc3339();
    const small = moduleStatuses(3, now);
    const created = await expectStatus(
      client.request('PATCH', `${BASE}/${smallName}/status`, { body: JSON.stringify({ status: statusOf(small, 'verifying 3 modules', now) }), headers: MERGE }),
      200,
      'write the small status',
    );
    const rv = resourceVersionOf(created.body);
    if (rv === undefined) throw new Error('no resourceVersion in the small object');
    const setupStart = performance.now();
    for (let i = 0; i < PLAN.watchers; i++) {
      const w = new Watcher();
      w.keepLast = i === 0;
      w.start(server, tls, rv);
      watchers.push(w);
    }
    // Wait (bounded) for every watcher's response headers. A server that sends them only with the
    // first event gets there through the first warm-up round instead.
    const headersDeadline = performance.now() + WATCH_EVENT_TIMEOUT_MS;
    while (watchers.some((w) => w.headersAt === undefined && !w.error) && performance.now() < headersDeadline) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    const failed = watchers.find((w) => w.error);
    if (failed) throw new Error(`a watch failed to start: ${failed.error!.message}`);
    const headersBeforeFirstEvent = watchers.every((w) => w.headersAt !== undefined);
    if (!headersBeforeFirstEvent) progress(`warning: not every watcher had response headers ${WATCH_EVENT_TIMEOUT_MS} ms after starting, before any event`);
    // Warm-up rounds (not counted) also prove that every watcher is subscribed and streaming.
    const smallRun = await watchRounds(client, watchers, smallName, 3, PLAN.watchWarmupRounds, PLAN.smallRounds, 'small');
    const setupMs = round(Math.max(...watchers.map((w) => w.headersAt ?? NaN)) - setupStart);
    progress(`watch, small object: p50 ${smallRun.delay.p50} ms, p99 ${smallRun.delay.p99} ms`);
    checkLastEvent(watchers[0]!, 3);
    const bigRun = await watchRounds(client, watchers, bigName, PLAN.modules, 1, PLAN.bigRounds, `${PLAN.modules} modules`);
    progress(`watch, ${PLAN.modules}-module object: p50 ${bigRun.delay.p50} ms, p99 ${bigRun.delay.p99} ms`);
    checkLastEvent(watchers[0]!, PLAN.modules);
    return { watchers: PLAN.watchers, setupMs, headersBeforeFirstEvent, small: smallRun, big: bigRun };
  } finally {
    for (const w of watchers) w.close();
    client.close();
  }
}

/** Parses the last event one watcher kept (outside the timing) to prove it carried the whole object. */
function checkLastEvent(w: Watcher, modules: number): void {
  if (!w.lastLine) throw new Error('watcher 0 kept no event');
  const ev = JSON.parse(w.lastLine.toString('utf8')) as { type?: string; object?: { status?: { modules?: unknown[] } } };
  const n = ev.object?.status?.modules?.length;
  if (ev.type !== 'MODIFIED' || n !== modules) throw new Error(`the last watch event has type ${String(ev.type)} and ${String(n)} modules, expected MODIFIED with ${modules}`);
  w.lastLine = undefined;
}

// ---- Phase 3: creates per second ---------------------------------------------------------------

interface CreateRun {
  readonly clients: number;
  readonly creates: number;
  readonly seconds: number;
  readonly perSecond: number;
  readonly latency: Summary;
}

let createRunIndex = 0;

async function phaseCreate(server: TestServer, tls: Tls, concurrency: number): Promise<CreateRun> {
  const runIndex = createRunIndex++;
  const clients = Array.from({ length: concurrency }, () => new Client(server, tls, 1));
  try {
    // Open and warm every connection first: connection setup is not measured.
    await Promise.all(clients.map((c) => expectStatus(c.request('GET', BASE + '?limit=1'), 200, 'warm-up list')));
    const latencies: number[] = [];
    const start = performance.now();
    const end = start + PLAN.createSeconds * 1000;
    let last = start;
    await Promise.all(
      clients.map(async (c, ci) => {
        for (let i = 0; i < PLAN.createMaxPerClient && performance.now() < end; i++) {
          checkDeadline('creates');
          const name = `bench-r${runIndex}-c${concurrency}-${ci}-${i}`;
          const r = await expectStatus(c.request('POST', BASE, { body: createBody(name, `6.1.0-${i % 40}-amd64`), headers: JSON_CT }), 201, `create ${name}`);
          latencies.push(r.ms);
          last = Math.max(last, performance.now());
        }
      }),
    );
    const seconds = (last - start) / 1000;
    return { clients: concurrency, creates: latencies.length, seconds: round(seconds), perSecond: round(latencies.length / seconds, 1), latency: summarize(latencies) };
  } finally {
    for (const c of clients) c.close();
  }
}

// ---- Report ----------------------------------------------------------------------------------

interface Goal {
  readonly goal: string;
  readonly limitMs: number;
  readonly valueMs: number;
  readonly met: boolean;
}

interface Report {
  readonly date: string;
  readonly command: string;
  readonly mode: 'full' | 'quick';
  readonly node: string;
  readonly cpus: number;
  readonly cpuModel: string;
  /** 1-minute load average at the start and at the end of the run. */
  readonly loadAverage: { readonly start: number; readonly end: number };
  readonly plan: Plan;
  readonly serverPid: number | null;
  readonly phases: readonly Phase[];
  /** Creating the 10,000-module status (setup of phases 1 and 2). */
  readonly statusWrite?: StatusWrite;
  readonly get?: GetResult;
  readonly watch?: WatchResult;
  readonly create?: readonly CreateRun[];
  readonly process: readonly ProcSample[];
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
  const mem = (after: string) => {
    const s = r.process.find((p) => p.after === after);
    return s
      ? `  server after the phase: VmRSS ${mib(s.vmRssKiB)}, VmHWM ${mib(s.vmHwmKiB)}\n  CPU during the phase (${s.wallSeconds.toFixed(1)} s wall, ${r.cpus} CPUs): server ${s.cpuSeconds === null ? 'n/a' : `${s.cpuSeconds.toFixed(2)} s`}, bench clients ${s.clientCpuSeconds.toFixed(2)} s, other processes ${sec(s.otherCpuSeconds)}, irq/softirq ${sec(s.irqCpuSeconds)}, steal ${sec(s.stealCpuSeconds)}`
      : '  server: n/a';
  };
  const goalLine = (name: string) => {
    const g = r.goals.find((x) => x.goal === name);
    return g ? `  goal ${g.goal}: ${num(g.valueMs)} ms -> ${g.met ? 'goal met' : 'goal missed'}` : '';
  };
  out.push(`kmm-preflight API benchmark (${r.mode}), ${r.date}`);
  out.push(`node ${r.node}, ${r.cpus} CPUs (${r.cpuModel}), server pid ${r.serverPid ?? 'n/a'}; client and server share the machine`);
  out.push(`1-minute load average: ${r.loadAverage.start.toFixed(2)} at the start, ${r.loadAverage.end.toFixed(2)} at the end`);
  out.push(`command: ${r.command}`);
  const start = r.process.find((p) => p.after === 'startup');
  if (start) out.push(`after startup: server VmRSS ${mib(start.vmRssKiB)}, VmHWM ${mib(start.vmHwmKiB)}`);
  if (r.statusWrite) {
    out.push(`setup: writing the ${r.plan.modules}-module status (PATCH /status, merge patch of ${bytes(r.statusWrite.bodyBytes)}) took ${num(r.statusWrite.ms)} ms`);
  }
  if (r.get) {
    const g = r.get;
    out.push('');
    out.push(`1. GET of one PreflightValidation with ${r.plan.modules} module statuses (${r.plan.getN} sequential GETs after ${r.plan.getWarmup} warm-up, one keep-alive connection)`);
    out.push(`   ${padEnd('Accept', 18)}${pad('n', 5)}${pad('p50 ms', 9)}${pad('p90 ms', 9)}${pad('p99 ms', 9)}${pad('max ms', 9)}${pad('body', 12)}${pad('conns', 7)}`);
    for (const [label, s] of [['application/json', g.json], ['Table (kubectl)', g.table]] as const) {
      out.push(`   ${padEnd(label, 18)}${pad(s.n, 5)}${pad(num(s.p50), 9)}${pad(num(s.p90), 9)}${pad(num(s.p99), 9)}${pad(num(s.max), 9)}${pad(bytes(s.bytes), 12)}${pad(s.connections, 7)}`);
    }
    out.push(goalLine(`GET p50 < ${GOAL_GET_P50_MS} ms`));
    out.push(mem('get'));
  }
  if (r.watch) {
    const w = r.watch;
    out.push('');
    out.push(`2. Watch fan-out: ${w.watchers} watchers (one connection each) on preflightvalidations?watch=true; delay from just before a status PATCH to each watcher having the MODIFIED line`);
    out.push(`   ${padEnd('object', 16)}${pad('rounds', 7)}${pad('delays', 8)}${pad('p50 ms', 9)}${pad('p90 ms', 9)}${pad('p99 ms', 9)}${pad('max ms', 9)}${pad('last p50', 10)}${pad('PATCH p50', 11)}${pad('event', 12)}`);
    for (const run of [w.small, w.big]) {
      out.push(
        `   ${padEnd(run.object, 16)}${pad(run.rounds, 7)}${pad(run.delay.n, 8)}${pad(num(run.delay.p50), 9)}${pad(num(run.delay.p90), 9)}${pad(num(run.delay.p99), 9)}${pad(num(run.delay.max), 9)}${pad(num(run.lastWatcher.p50), 10)}${pad(num(run.patch.p50), 11)}${pad(bytes(run.eventBytes), 12)}`,
      );
    }
    out.push(`   ("last p50": median over rounds of the slowest watcher; "PATCH p50": the PATCH's own response time)`);
    out.push(
      w.headersBeforeFirstEvent
        ? `   all ${w.watchers} watches had their response headers ${num(w.setupMs)} ms after they were started (connect, TLS, open), before any event`
        : `   the server held the response headers back until the first event: the last of the ${w.watchers} watchers had them ${num(w.setupMs)} ms after the start (after a warm-up PATCH)`,
    );
    out.push(goalLine(`watch p99 < ${GOAL_WATCH_P99_MS} ms (small object)`));
    out.push(`  (no goal for the ${r.plan.modules}-module object: each event carries ${bytes(w.big.eventBytes)} to ${w.watchers} clients)`);
    out.push(mem('watch'));
  }
  if (r.create) {
    out.push('');
    out.push(`3. Creates: C concurrent clients (one keep-alive connection each) creating distinct PreflightValidations for ~${r.plan.createSeconds} s`);
    out.push(`   ${pad('C', 3)}${pad('creates', 9)}${pad('seconds', 9)}${pad('creates/s', 11)}${pad('p50 ms', 9)}${pad('p99 ms', 9)}${pad('max ms', 9)}`);
    for (const c of r.create) {
      out.push(`   ${pad(c.clients, 3)}${pad(c.creates, 9)}${pad(c.seconds.toFixed(2), 9)}${pad(c.perSecond.toFixed(1), 11)}${pad(num(c.latency.p50), 9)}${pad(num(c.latency.p99), 9)}${pad(num(c.latency.max), 9)}`);
    }
    out.push(mem('create'));
  }
  out.push('');
  if (r.error) out.push(`ERROR: ${r.error}`);
  out.push(`total ${r.totalSeconds.toFixed(1)} s`);
  return out.join('\n') + '\n';
}

// ---- Main ------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const t0 = Date.now();
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  const command = ['node', 'bench/api.ts', ...process.argv.slice(2)].map(quote).join(' ');
  const loadStart = loadavg()[0] ?? 0;
  const samples: ProcSample[] = [];
  const goals: Goal[] = [];
  let server: TestServer | undefined;
  let pid: number | undefined;
  let statusWrite: StatusWrite | undefined;
  let get: GetResult | undefined;
  let watch: WatchResult | undefined;
  const create: CreateRun[] = [];
  let error: string | undefined;

  // A hard stop in case something hangs outside the bounded loops (the server is still stopped).
  const watchdog = setTimeout(() => {
    progress(`the run exceeded ${PLAN.totalLimitMs / 1000} s; stopping`);
    void (server?.stop() ?? Promise.resolve()).finally(() => process.exit(1));
  }, PLAN.totalLimitMs + 30_000);
  watchdog.unref();
  // Ctrl-C or kill: stop the server now (the run then fails on its closed connections and
  // reports); exit anyway if that does not happen within 10 s.
  let interrupted: NodeJS.Signals | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted = sig;
    progress(`${sig}: stopping the server`);
    void (server?.stop() ?? Promise.resolve()).finally(() => setTimeout(() => process.exit(130), 10_000).unref());
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    progress(`starting the server (${PLAN.mode} run)`);
    const serverNodeOptions = args['server-node-options'];
    const savedNodeOptions = process.env['NODE_OPTIONS'];
    if (serverNodeOptions !== undefined) process.env['NODE_OPTIONS'] = serverNodeOptions;
    try {
      server = await startTestServer();
    } finally {
      if (serverNodeOptions !== undefined) {
        if (savedNodeOptions === undefined) delete process.env['NODE_OPTIONS'];
        else process.env['NODE_OPTIONS'] = savedNodeOptions;
      }
    }
    pid = findServerPid(server);
    if (pid === undefined) progress('warning: could not find the server pid; memory is reported as n/a');
    samples.push(sampleProcess(pid, 'startup'));
    const tls: Tls = {
      ca: await readFile(join(server.certDir, 'ca.crt')),
      cert: await readFile(join(server.certDir, 'admin.crt')),
      key: await readFile(join(server.certDir, 'admin.key')),
    };

    const big = 'bench-ten-thousand';
    if (args.phases.has('get') || args.phases.has('watch')) {
      statusWrite = await createBigObject(server, tls, big);
      samples.push(sampleProcess(pid, 'setup'));
    }

    if (args.phases.has('get')) {
      progress(`phase 1: GET of the ${PLAN.modules}-module object`);
      get = await phaseGet(server, tls, big);
      samples.push(sampleProcess(pid, 'get'));
      goals.push({ goal: `GET p50 < ${GOAL_GET_P50_MS} ms`, limitMs: GOAL_GET_P50_MS, valueMs: get.json.p50, met: get.json.p50 < GOAL_GET_P50_MS });
      progress(`GET p50 ${get.json.p50} ms, p99 ${get.json.p99} ms; Table p50 ${get.table.p50} ms`);
    }

    if (args.phases.has('watch')) {
      progress(`phase 2: ${PLAN.watchers} watchers`);
      watch = await phaseWatch(server, tls, 'bench-small', big);
      samples.push(sampleProcess(pid, 'watch'));
      goals.push({
        goal: `watch p99 < ${GOAL_WATCH_P99_MS} ms (small object)`,
        limitMs: GOAL_WATCH_P99_MS,
        valueMs: watch.small.delay.p99,
        met: watch.small.delay.p99 < GOAL_WATCH_P99_MS,
      });
    }

    if (args.phases.has('create')) {
      for (const c of PLAN.createClients) {
        progress(`phase 3: creates with ${c} client(s) for ${PLAN.createSeconds} s`);
        const run = await phaseCreate(server, tls, c);
        create.push(run);
        progress(`${c} client(s): ${run.perSecond} creates/s, p50 ${run.latency.p50} ms`);
      }
      samples.push(sampleProcess(pid, 'create'));
    }
  } catch (err) {
    error = err instanceof Error ? err.message : String(err);
    if (interrupted) error = `interrupted by ${interrupted} (${error})`;
    progress(`error: ${error}`);
    if (server && !interrupted) progress(`server output (tail):\n${server.output().slice(-2000)}`);
  } finally {
    if (server) {
      progress('stopping the server');
      await server.stop().catch((e: unknown) => progress(`stopping the server failed: ${String(e)}`));
    }
    clearTimeout(watchdog);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }

  const report: Report = {
    date: new Date().toISOString(),
    command,
    mode: PLAN.mode,
    node: process.version,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    loadAverage: { start: round(loadStart), end: round(loadavg()[0] ?? 0) },
    plan: PLAN,
    serverPid: pid ?? null,
    phases: PHASES.filter((p) => args.phases.has(p)),
    ...(statusWrite ? { statusWrite } : {}),
    ...(get ? { get } : {}),
    ...(watch ? { watch } : {}),
    ...(create.length > 0 ? { create } : {}),
    process: samples,
    goals,
    totalSeconds: round((Date.now() - t0) / 1000, 1),
    ...(error !== undefined ? { error } : {}),
  };
  process.stdout.write(args.json ? `${JSON.stringify(report, (_k, v: unknown) => (typeof v === 'number' && Number.isNaN(v) ? null : v), 2)}\n` : formatReport(report));
  return interrupted ? 130 : error === undefined ? 0 : 1;
}

process.exitCode = await main();
