/**
 * Benchmark of the validation controller in the real server (`src/main.ts` as a child process,
 * started with `startTestServer()` as the e2e tests do), in stand-alone mode: `--modules-dir` with
 * N KMM Module manifests, SQLite storage, a real registry (Debian's docker-registry on loopback,
 * `startRegistry()` from test/helpers/registry.ts) and the real Image stage.
 *
 *   node bench/controller.ts           full run: 1,000 Modules in 10 namespaces, 200 images (about 20 s on 2 cores)
 *   node bench/controller.ts --quick   CI smoke run: 100 Modules, 20 images (about 5 s)
 *   node bench/controller.ts --json    one JSON object on stdout instead of the report
 *   node bench/controller.ts --validation-concurrency=32
 *                                      the server's --validation-concurrency (default: the server's own)
 *   node bench/controller.ts --server-node-options="--cpu-prof --cpu-prof-dir=/tmp/kmm-prof"
 *                                      NODE_OPTIONS for the server child only (profiling; note the `=`)
 *
 * Every image holds the modules of the 5 Modules that use it (five `.ko` files and a `modules.dep`
 * listing them, in one layer), so a layer is shared by 5 Modules and its scan can be cached. The
 * Module manifests are written to a directory, the server is started with `--modules-dir` and,
 * once its controller has started, one PreflightValidation is created for the kernel. A watch on
 * that object, from the create's resourceVersion, sees every status write. Measured: the time from
 * the create to `counts.total == N` and to `Verified=True`; the server's peak memory (VmHWM); the
 * status writes against the Modules' real transitions; the bytes the registry sent; CPU.
 *
 * Exits 0 when the run completed (a missed goal is reported, not failed), 1 on an error (setup
 * failed, the server or a request failed, a Module did not verify, the run went over its time
 * limit), 130 when interrupted. The server, the registry and the temporary files are removed
 * however the run ends. See bench/README.md.
 */
import { benchCommandLine, clockTicks, findRegistryPid, findServerPid, machineCpuSeconds, pad, progress, round, procStatusKiB, procCpuSeconds } from './lib.ts';
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import type { ClientRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { TestRegistry } from '../test/helpers/registry.ts';
import type { TestServer } from '../test/helpers/server.ts';

const KERNEL = '6.1.0-18-amd64';
const VERMAGIC = `${KERNEL} SMP preempt mod_unload modversions `;
const BASE = '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations';
const PFV_NAME = 'bench-upgrade';
const MODULES_PER_IMAGE = 5;
const REQUEST_TIMEOUT_MS = 30_000;
const GOAL_VERIFIED_S = 60;
const GOAL_PEAK_MIB = 300;

// ---- Options ---------------------------------------------------------------------------------

const USAGE =
  'usage: node bench/controller.ts [--quick] [--json] [--validation-concurrency=N] [--server-node-options="<NODE_OPTIONS of the server>"]\n';

const args = benchCommandLine('bench/controller.ts', USAGE, {
  'validation-concurrency': { type: 'string' },
  'server-node-options': { type: 'string' },
}, (values) => {
  const c = values['validation-concurrency'];
  if (c !== undefined && !/^[1-9]\d*$/.test(c)) throw new Error(`--validation-concurrency must be a positive integer, got "${c}"`);
  return { ...values, validationConcurrency: c === undefined ? undefined : Number(c) };
});

interface Plan {
  readonly mode: 'full' | 'quick';
  readonly modules: number;
  readonly images: number;
  readonly namespaces: number;
  /** Module objects compiled (gcc) at once, and images pushed at once, during the setup. */
  readonly buildConcurrency: number;
  readonly pushConcurrency: number;
  /** The server's --validation-concurrency, when given. */
  readonly validationConcurrency: number | null;
  /** NODE_OPTIONS of the server child, when given (profiling, heap flags). */
  readonly serverNodeOptions: string | null;
  /** From the start of the server to "preflight controller started". */
  readonly controllerStartTimeoutMs: number;
  /** From the create to Verified=True; past it the run fails. */
  readonly verifyTimeoutMs: number;
  /** How long the watch goes on after Verified=True, to catch late status writes. */
  readonly settleMs: number;
  /** The whole run is aborted (exit 1) past this. */
  readonly totalLimitMs: number;
}

const PLAN: Plan = args.quick
  ? {
      mode: 'quick',
      modules: 100,
      images: 20,
      namespaces: 10,
      buildConcurrency: 4,
      pushConcurrency: 8,
      validationConcurrency: args.validationConcurrency ?? null,
      serverNodeOptions: args['server-node-options'] ?? null,
      controllerStartTimeoutMs: 30_000,
      verifyTimeoutMs: 30_000,
      settleMs: 1_500,
      totalLimitMs: 90_000,
    }
  : {
      mode: 'full',
      modules: 1000,
      images: 200,
      namespaces: 10,
      buildConcurrency: 4,
      pushConcurrency: 8,
      validationConcurrency: args.validationConcurrency ?? null,
      serverNodeOptions: args['server-node-options'] ?? null,
      controllerStartTimeoutMs: 60_000,
      verifyTimeoutMs: 300_000,
      settleMs: 3_000,
      totalLimitMs: 15 * 60_000,
    };
if (PLAN.modules !== PLAN.images * MODULES_PER_IMAGE) throw new Error('plan: modules must be images × 5');

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const runDeadline = Date.now() + PLAN.totalLimitMs;
/** Set by SIGINT/SIGTERM: every bounded loop stops at its next check. */
let stopRequested: NodeJS.Signals | undefined;
function checkDeadline(what: string): void {
  if (stopRequested) throw new Error(`interrupted by ${stopRequested} during ${what}`);
  if (Date.now() > runDeadline) throw new Error(`the benchmark overran its ${PLAN.totalLimitMs / 1000} s limit during ${what}`);
}

/** Runs `fn` over `items` with at most `limit` at once. */
async function pool<T>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      for (;;) {
        const i = next++;
        if (i >= items.length) return;
        checkDeadline('the setup');
        await fn(items[i]!, i);
      }
    }),
  );
}

// ---- /proc -----------------------------------------------------------------------------------






/**
 * `wchar` of /proc/<pid>/io: bytes the process passed to write/send/sendfile. For the registry,
 * which logs nothing at level warn and writes no storage while serving pulls, that is the HTTP
 * responses it sent (headers and bodies).
 */
function procWriteBytes(pid: number | undefined): number | null {
  if (pid === undefined) return null;
  try {
    const m = /^wchar:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}


interface CpuMark {
  readonly wall: number;
  readonly server: number | null;
  readonly registry: number | null;
  readonly bench: number;
  readonly machine: number | null;
  readonly registrySent: number | null;
}

function cpuMark(serverPid: number | undefined, registryPid: number | undefined): CpuMark {
  const u = process.cpuUsage();
  return {
    wall: performance.now(),
    server: procCpuSeconds(serverPid),
    registry: procCpuSeconds(registryPid),
    bench: (u.user + u.system) / 1e6,
    machine: machineCpuSeconds(),
    registrySent: procWriteBytes(registryPid),
  };
}

interface CpuWindow {
  readonly wallSeconds: number;
  readonly serverSeconds: number | null;
  readonly registrySeconds: number | null;
  readonly benchSeconds: number;
  /** Everything else on the machine (other processes, kernel threads). */
  readonly otherSeconds: number | null;
}

function cpuWindow(a: CpuMark, b: CpuMark): CpuWindow {
  const d = (x: number | null, y: number | null) => (x === null || y === null ? null : round(y - x));
  const serverSeconds = d(a.server, b.server);
  const registrySeconds = d(a.registry, b.registry);
  const benchSeconds = round(b.bench - a.bench);
  const machine = d(a.machine, b.machine);
  const otherSeconds =
    machine === null || serverSeconds === null || registrySeconds === null ? null : round(Math.max(0, machine - serverSeconds - registrySeconds - benchSeconds));
  return { wallSeconds: round((b.wall - a.wall) / 1000), serverSeconds, registrySeconds, benchSeconds, otherSeconds };
}

// ---- HTTP ------------------------------------------------------------------------------------

interface Tls {
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
}

function request(server: TestServer, tls: Tls, method: string, path: string, body?: string): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { accept: 'application/json' };
    if (body !== undefined) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = String(Buffer.byteLength(body));
    }
    const req = httpsRequest({ host: '127.0.0.1', port: server.port, method, path, headers, agent: false, ...tls }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.setTimeout(REQUEST_TIMEOUT_MS, () => req.destroy(new Error(`${method} ${path} timed out after ${REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

// ---- The validation object as the watch shows it ---------------------------------------------

interface ModuleStatusLite {
  readonly namespace: string;
  readonly name: string;
  readonly verificationStatus: string;
}

interface PfvLite {
  readonly metadata: { readonly resourceVersion?: string };
  readonly status?: {
    readonly modules?: readonly ModuleStatusLite[];
    readonly counts?: { total: number; verified: number; failed: number; error: number; pending: number };
    readonly conditions?: readonly { type: string; status: string; reason?: string; message?: string }[];
  };
}

/** One status write, as a MODIFIED watch event of the object. */
interface Write {
  /** Milliseconds from just before the create was sent to the arrival of the event. */
  readonly atMs: number;
  readonly resourceVersion: string;
  /** Size of the event line. */
  readonly bytes: number;
  readonly total: number;
  readonly verified: number;
  readonly pending: number;
  readonly failed: number;
  readonly error: number;
  readonly verifiedCondition: string;
  /** Module entries whose verificationStatus changed in this write (from Unknown for new entries). */
  readonly transitions: number;
}

/**
 * A watch of one object from a resourceVersion (so no write can be missed), parsing every event.
 * A Module entry's transitions are counted against its previous written state, and against
 * `Unknown` for a new entry: every Module starts as Unknown (waiting), so a Module verified before
 * its first write still counts its one real transition, Unknown→True.
 */
class ObjectWatch {
  readonly writes: Write[] = [];
  readonly #state = new Map<string, string>();
  #pending: Buffer[] = [];
  #req: ClientRequest | undefined;
  #t0 = 0;
  #listeners = new Set<() => void>();
  error: Error | undefined;
  ended = false;
  addedSeen = false;
  /** Non-MODIFIED, non-BOOKMARK events after ADDED (DELETED, ERROR). */
  readonly others: string[] = [];

  start(server: TestServer, tls: Tls, name: string, resourceVersion: string, t0: number, timeoutSeconds: number): void {
    this.#t0 = t0;
    const path = `${BASE}?watch=true&resourceVersion=${encodeURIComponent(resourceVersion)}&fieldSelector=${encodeURIComponent(`metadata.name=${name}`)}&timeoutSeconds=${timeoutSeconds}`;
    const req = httpsRequest({ host: '127.0.0.1', port: server.port, method: 'GET', path, agent: false, headers: { accept: 'application/json' }, ...tls }, (res) => {
      if (res.statusCode !== 200) this.#fail(new Error(`the watch answered HTTP ${res.statusCode}`));
      res.on('data', (chunk: Buffer) => this.#data(chunk));
      res.on('end', () => {
        this.ended = true;
        this.#notify();
      });
      res.on('error', (e) => this.#fail(e));
    });
    req.on('error', (e) => this.#fail(e));
    req.end();
    this.#req = req;
  }

  /** Resolves on the next event, error or end, or after `ms`. */
  next(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#listeners.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.#listeners.add(done);
    });
  }

  close(): void {
    this.#req?.destroy();
  }

  get transitions(): number {
    return this.writes.reduce((a, w) => a + w.transitions, 0);
  }

  /** Module entries of the last write, by status. */
  get lastStates(): ReadonlyMap<string, string> {
    return this.#state;
  }

  #fail(e: Error): void {
    this.error ??= e;
    this.#notify();
  }

  #notify(): void {
    for (const l of [...this.#listeners]) l();
  }

  #data(chunk: Buffer): void {
    const at = performance.now();
    let rest = chunk;
    for (;;) {
      const nl = rest.indexOf(0x0a);
      if (nl < 0) {
        if (rest.length > 0) this.#pending.push(rest);
        break;
      }
      const head = rest.subarray(0, nl);
      const line = this.#pending.length === 0 ? head : Buffer.concat([...this.#pending, head]);
      this.#pending = [];
      rest = rest.subarray(nl + 1);
      if (line.length > 0) {
        try {
          this.#event(line, at);
        } catch (err) {
          this.#fail(new Error(`a watch event could not be read: ${(err as Error).message}`));
        }
      }
    }
    this.#notify();
  }

  #event(line: Buffer, at: number): void {
    const ev = JSON.parse(line.toString('utf8')) as { type: string; object: PfvLite & { message?: string } };
    if (ev.type === 'BOOKMARK') return;
    if (ev.type === 'ADDED') {
      this.addedSeen = true;
      this.#apply(ev.object);
      return;
    }
    if (ev.type !== 'MODIFIED') {
      this.others.push(ev.type);
      if (ev.type === 'ERROR') this.#fail(new Error(`the watch sent an ERROR event: ${ev.object.message ?? JSON.stringify(ev.object).slice(0, 300)}`));
      return;
    }
    const transitions = this.#apply(ev.object);
    const s = ev.object.status;
    const c = s?.counts ?? { total: 0, verified: 0, failed: 0, error: 0, pending: 0 };
    this.writes.push({
      atMs: round(at - this.#t0, 1),
      resourceVersion: ev.object.metadata.resourceVersion ?? '',
      bytes: line.length + 1,
      total: c.total,
      verified: c.verified,
      pending: c.pending,
      failed: c.failed,
      error: c.error,
      verifiedCondition: s?.conditions?.find((x) => x.type === 'Verified')?.status ?? 'absent',
      transitions,
    });
  }

  #apply(obj: PfvLite): number {
    let transitions = 0;
    for (const m of obj.status?.modules ?? []) {
      const key = `${m.namespace}/${m.name}`;
      const before = this.#state.get(key) ?? 'Unknown';
      if (m.verificationStatus !== before) transitions++;
      this.#state.set(key, m.verificationStatus);
    }
    return transitions;
  }
}

// ---- Setup -----------------------------------------------------------------------------------

interface ModuleDef {
  readonly namespace: string;
  readonly name: string;
  readonly image: number;
}

/**
 * Module j (0 ≤ j < N) is `bench-ns-<j / (N/10)>/kmod-<j>` and uses image j / 5: a vendor's Modules
 * that share an image sit next to each other in one namespace, as they would in a cluster.
 */
function moduleDefs(plan: Plan): ModuleDef[] {
  const perNamespace = Math.ceil(plan.modules / plan.namespaces);
  const width = String(plan.modules - 1).length;
  return Array.from({ length: plan.modules }, (_, j) => ({
    namespace: `bench-ns-${Math.floor(j / perNamespace)}`,
    name: `kmod-${String(j).padStart(width, '0')}`,
    image: Math.floor(j / MODULES_PER_IMAGE),
  }));
}

const imageRepo = (i: number) => `bench/drivers-${String(i).padStart(3, '0')}`;

const moduleYaml = (m: ModuleDef, registryHost: string) => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: ${m.name}, namespace: ${m.namespace}}
spec:
  selector: {kubernetes.io/arch: amd64}
  moduleLoader:
    container:
      modprobe: {moduleName: ${m.name}}
      kernelMappings:
        - regexp: '^6\\..*'
          containerImage: ${registryHost}/${imageRepo(m.image)}:\${KERNEL_FULL_VERSION}
          registryTLS: {insecure: true}
`;

interface Setup {
  readonly buildSeconds: number;
  readonly pushSeconds: number;
  /** Sums over the images pushed. */
  readonly layerBytes: number;
  readonly manifestBytes: number;
  readonly configBytes: number;
  readonly moduleFileBytes: number;
  readonly manifestsDir: string;
}

async function setup(plan: Plan, registry: TestRegistry, tmp: string, defs: readonly ModuleDef[]): Promise<Setup> {
  const { buildModuleObject, requireGcc } = await import('../test/helpers/kmod-fixtures.ts');
  const { pushImage } = await import('../test/helpers/images.ts');
  const { createRegistryClient } = await import('../src/registry/client.ts');
  await requireGcc();

  progress(`compiling ${defs.length} module objects (gcc, ${plan.buildConcurrency} at once)`);
  const t0 = performance.now();
  const ko = new Map<string, Buffer>();
  await pool(defs, plan.buildConcurrency, async (m) => {
    ko.set(m.name, await buildModuleObject({ name: m.name, vermagic: VERMAGIC }));
  });
  const buildSeconds = (performance.now() - t0) / 1000;

  progress(`pushing ${plan.images} images (${MODULES_PER_IMAGE} modules each, one layer) to ${registry.host}`);
  const t1 = performance.now();
  const byImage = new Map<number, ModuleDef[]>();
  for (const m of defs) byImage.set(m.image, [...(byImage.get(m.image) ?? []), m]);
  let layerBytes = 0;
  let manifestBytes = 0;
  let configBytes = 0;
  let moduleFileBytes = 0;
  const client = createRegistryClient({ userAgent: 'kmm-preflight-bench-setup' });
  try {
    await pool([...byImage.keys()], plan.pushConcurrency, async (i) => {
      const members = byImage.get(i)!;
      const dir = `opt/lib/modules/${KERNEL}`;
      const entries = [
        ...members.map((m) => ({ path: `${dir}/extra/${m.name}.ko`, content: ko.get(m.name)! })),
        { path: `${dir}/modules.dep`, content: members.map((m) => `extra/${m.name}.ko:\n`).join('') },
      ];
      const pushed = await pushImage(registry, `${imageRepo(i)}:${KERNEL}`, { layers: [{ entries }], client });
      layerBytes += pushed.layers.reduce((a, l) => a + l.size, 0);
      manifestBytes += pushed.manifest.length;
      configBytes += pushed.config.size;
      moduleFileBytes += members.reduce((a, m) => a + ko.get(m.name)!.length, 0);
    });
  } finally {
    await client.close();
  }
  const pushSeconds = (performance.now() - t1) / 1000;

  const manifestsDir = join(tmp, 'modules');
  await mkdir(manifestsDir);
  for (const m of defs) await writeFile(join(manifestsDir, `${m.namespace}_${m.name}.yaml`), moduleYaml(m, registry.host));
  return { buildSeconds: round(buildSeconds, 1), pushSeconds: round(pushSeconds, 1), layerBytes, manifestBytes, configBytes, moduleFileBytes, manifestsDir };
}

// ---- The measured run ------------------------------------------------------------------------

/** The pino JSON lines of the server whose `msg` is `msg`. */
function logLines(output: string, msg: string): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const line of output.split('\n')) {
    if (!line.includes(msg)) continue;
    try {
      const o = JSON.parse(line) as Record<string, unknown>;
      if (o['msg'] === msg) out.push(o);
    } catch {
      // not JSON
    }
  }
  return out;
}

/** Numbers from the server's /metrics (Prometheus text), by series; undefined when absent. */
async function scrapeMetrics(server: TestServer, tls: Tls): Promise<Map<string, number>> {
  const r = await request(server, tls, 'GET', '/metrics');
  const out = new Map<string, number>();
  if (r.status !== 200) return out;
  for (const line of r.body.toString('utf8').split('\n')) {
    if (line.startsWith('#') || !line.startsWith('kmm_preflight_')) continue;
    const i = line.lastIndexOf(' ');
    const v = Number(line.slice(i + 1));
    if (Number.isFinite(v)) out.set(line.slice(0, i), v);
  }
  return out;
}

interface MemorySample {
  readonly atMs: number;
  readonly rssKiB: number;
}

interface Measured {
  /** VmRSS / VmHWM of the server once its controller had started (the manifests read), before the create. */
  readonly beforeCreate: { readonly vmRssKiB: number | null; readonly vmHwmKiB: number | null };
  /** At the end of the watch. */
  readonly after: { readonly vmRssKiB: number | null; readonly vmHwmKiB: number | null };
  /** Peak of VmRSS sampled every 100 ms during the run, and when (ms after the create). */
  readonly sampledPeak: MemorySample | null;
  readonly controllerStartMs: number;
  readonly createMs: number;
  /** ms from the create to the first write with counts.total == N; null if never. */
  readonly totalMs: number | null;
  /** ms from the create to the first write with Verified=True; null if never. */
  readonly verifiedMs: number | null;
  readonly writes: readonly Write[];
  /** Writes after the one that made Verified True, within settleMs. */
  readonly writesAfterVerified: number;
  readonly transitions: number;
  readonly finalStates: Readonly<Record<string, number>>;
  /** The object read with GET after the watch. */
  readonly finalObjectBytes: number;
  readonly cpu: CpuWindow;
  /** wchar of the registry over the window (create → end of the watch); null without /proc. */
  readonly registrySentBytes: number | null;
  /** From the server's /metrics, when it has these series. */
  readonly metrics: {
    readonly statusWrites: number | null;
    readonly registryReceivedBytes: number | null;
    readonly outcomes: Readonly<Record<string, number>>;
  };
}

async function measure(plan: Plan, server: TestServer, tls: Tls, serverPid: number | undefined, registryPid: number | undefined, startedAt: number): Promise<Measured> {
  // The controller starts after the API is ready: wait for it (the Modules are then read).
  const startDeadline = startedAt + plan.controllerStartTimeoutMs;
  while (logLines(server.output(), 'preflight controller started').length === 0) {
    if (performance.now() > startDeadline) throw new Error(`the controller did not start within ${plan.controllerStartTimeoutMs / 1000} s:\n${server.output().slice(-2000)}`);
    checkDeadline('the controller start');
    await sleep(50);
  }
  const controllerStartMs = round(performance.now() - startedAt, 0);
  const read = logLines(server.output(), 'manifests read').at(-1);
  if (read && read['modules'] !== plan.modules) throw new Error(`the server read ${String(read['modules'])} Modules from --modules-dir, expected ${plan.modules}`);
  progress(`controller started ${controllerStartMs} ms after the server was launched${read ? ` (${String(read['modules'])} Modules read)` : ''}`);

  const metricsBefore = await scrapeMetrics(server, tls);
  const beforeCreate = { vmRssKiB: procStatusKiB(serverPid, 'VmRSS'), vmHwmKiB: procStatusKiB(serverPid, 'VmHWM') };

  let sampledPeak: MemorySample | null = null;
  const mark0 = cpuMark(serverPid, registryPid);
  const t0 = performance.now();
  const sampler = setInterval(() => {
    const rssKiB = procStatusKiB(serverPid, 'VmRSS');
    if (rssKiB !== null && (sampledPeak === null || rssKiB > sampledPeak.rssKiB)) sampledPeak = { atMs: round(performance.now() - t0, 0), rssKiB };
  }, 100);

  const watch = new ObjectWatch();
  try {
    const body = JSON.stringify({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: PFV_NAME }, spec: { kernelVersion: KERNEL } });
    const created = await request(server, tls, 'POST', BASE, body);
    const createMs = round(performance.now() - t0, 1);
    if (created.status !== 201) throw new Error(`create: expected HTTP 201, got ${created.status}: ${created.body.toString('utf8').slice(0, 400)}`);
    const rv = (JSON.parse(created.body.toString('utf8')) as PfvLite).metadata.resourceVersion;
    if (!rv) throw new Error('the create answered without a resourceVersion');
    // From the create's revision: every later write of the object is an event, none is missed.
    watch.start(server, tls, PFV_NAME, rv, t0, Math.ceil(plan.verifyTimeoutMs / 1000) + 120);
    progress(`created ${PFV_NAME} (rv ${rv}) in ${createMs} ms; watching its status`);

    let verifiedMs: number | null = null;
    let totalMs: number | null = null;
    let lastReport = 0;
    let seen = 0;
    const verifyDeadline = t0 + plan.verifyTimeoutMs;
    for (;;) {
      if (watch.error) throw watch.error;
      if (watch.ended) throw new Error('the watch ended before Verified=True');
      for (; seen < watch.writes.length; seen++) {
        const w = watch.writes[seen]!;
        if (totalMs === null && w.total === plan.modules) totalMs = w.atMs;
        if (verifiedMs === null && w.verifiedCondition === 'True') verifiedMs = w.atMs;
        if (w.failed > 0 || (w.pending === 0 && w.error === 0 && w.verified < w.total)) {
          throw new Error(`a Module did not verify (write ${seen + 1}: ${w.verified} verified, ${w.failed} failed, ${w.error} errors of ${w.total}); the images or manifests are wrong`);
        }
      }
      if (verifiedMs !== null) break;
      if (performance.now() > verifyDeadline) {
        const w = watch.writes.at(-1);
        throw new Error(`Verified was not True ${plan.verifyTimeoutMs / 1000} s after the create (${watch.writes.length} writes; last: ${w ? `${w.verified}/${w.total} verified, ${w.pending} pending, ${w.error} errors` : 'none'})`);
      }
      checkDeadline('the validation');
      if (performance.now() - lastReport > 5000) {
        lastReport = performance.now();
        const w = watch.writes.at(-1);
        if (w) progress(`${((performance.now() - t0) / 1000).toFixed(1)} s: ${watch.writes.length} writes, ${w.verified}/${w.total} verified`);
      }
      await watch.next(1000);
    }
    const verifiedWrites = watch.writes.length;
    progress(`Verified=True ${(verifiedMs / 1000).toFixed(2)} s after the create, after ${verifiedWrites} status writes; watching ${plan.settleMs} ms more`);
    const settleEnd = performance.now() + plan.settleMs;
    while (performance.now() < settleEnd && !watch.error && !watch.ended) await watch.next(settleEnd - performance.now());
    if (watch.error) throw watch.error;
    clearInterval(sampler);
    const mark1 = cpuMark(serverPid, registryPid);
    const after = { vmRssKiB: procStatusKiB(serverPid, 'VmRSS'), vmHwmKiB: procStatusKiB(serverPid, 'VmHWM') };

    const final = await request(server, tls, 'GET', `${BASE}/${PFV_NAME}`);
    if (final.status !== 200) throw new Error(`GET ${PFV_NAME}: HTTP ${final.status}`);
    const obj = JSON.parse(final.body.toString('utf8')) as PfvLite;
    if (obj.metadata.resourceVersion !== watch.writes.at(-1)?.resourceVersion) {
      throw new Error(`the object's resourceVersion ${String(obj.metadata.resourceVersion)} is not that of the last watched write ${String(watch.writes.at(-1)?.resourceVersion)}: a write was missed`);
    }
    const finalStates: Record<string, number> = {};
    for (const m of obj.status?.modules ?? []) finalStates[m.verificationStatus] = (finalStates[m.verificationStatus] ?? 0) + 1;
    if (finalStates['True'] !== plan.modules) throw new Error(`the final status has ${JSON.stringify(finalStates)}, expected ${plan.modules} True`);

    const metricsAfter = await scrapeMetrics(server, tls);
    const delta = (k: string) => (metricsAfter.has(k) ? round((metricsAfter.get(k) ?? 0) - (metricsBefore.get(k) ?? 0), 0) : null);
    const outcomes: Record<string, number> = {};
    for (const [k, v] of metricsAfter) {
      const m = /^kmm_preflight_validation_outcomes_total\{(.*)\}$/.exec(k);
      if (m) outcomes[m[1]!.replaceAll('"', '')] = v - (metricsBefore.get(k) ?? 0);
    }
    return {
      beforeCreate,
      after,
      sampledPeak,
      controllerStartMs,
      createMs,
      totalMs,
      verifiedMs,
      writes: watch.writes,
      writesAfterVerified: watch.writes.length - verifiedWrites,
      transitions: watch.transitions,
      finalStates,
      finalObjectBytes: final.body.length,
      cpu: cpuWindow(mark0, mark1),
      registrySentBytes: mark0.registrySent === null || mark1.registrySent === null ? null : mark1.registrySent - mark0.registrySent,
      metrics: { statusWrites: delta('kmm_preflight_status_writes_total'), registryReceivedBytes: delta('kmm_preflight_registry_received_bytes'), outcomes },
    };
  } finally {
    clearInterval(sampler);
    watch.close();
  }
}

// ---- Report ----------------------------------------------------------------------------------

interface Goal {
  readonly goal: string;
  readonly value: string;
  readonly met: boolean;
}

interface Report {
  readonly date: string;
  readonly command: string;
  readonly mode: 'full' | 'quick';
  readonly node: string;
  readonly cpus: number;
  readonly cpuModel: string;
  readonly loadAverage: { readonly start: number; readonly end: number };
  readonly plan: Plan;
  readonly serverPid: number | null;
  readonly registryPid: number | null;
  readonly registryVersion: string | null;
  readonly setup?: Setup;
  readonly measured?: Measured;
  readonly goals: readonly Goal[];
  readonly totalSeconds: number;
  readonly error?: string;
}

function goals(plan: Plan, m: Measured | undefined): Goal[] {
  if (!m) return [];
  const out: Goal[] = [];
  if (m.verifiedMs !== null) {
    const s = m.verifiedMs / 1000;
    out.push({ goal: `Verified=True under ${GOAL_VERIFIED_S} s after the create`, value: `${s.toFixed(2)} s`, met: s < GOAL_VERIFIED_S });
  }
  const hwm = m.after.vmHwmKiB;
  if (hwm !== null) {
    const mib = hwm / 1024;
    out.push({ goal: `peak memory (VmHWM) of the server under ${GOAL_PEAK_MIB} MiB`, value: `${mib.toFixed(0)} MiB`, met: mib < GOAL_PEAK_MIB });
  }
  const writes = m.writes.length;
  out.push({
    goal: 'at most one status write per real transition',
    value: `${writes} writes for ${m.transitions} transitions (${(writes / Math.max(1, m.transitions)).toFixed(3)} per transition; ${plan.modules} Modules)`,
    met: writes <= m.transitions,
  });
  return out;
}

const mib = (kib: number | null) => (kib === null ? 'n/a' : `${(kib / 1024).toFixed(0)} MiB`);
const sec = (x: number | null) => (x === null ? 'n/a' : `${x.toFixed(2)} s`);
const fmtBytes = (b: number | null) =>
  b === null ? 'n/a' : b >= 1024 * 1024 ? `${(b / 1024 / 1024).toFixed(2)} MiB` : b >= 1024 ? `${(b / 1024).toFixed(1)} KiB` : `${b} B`;

/** At most `max` rows: the first and last few writes and evenly spaced ones between. */
function pickRows<T>(xs: readonly T[], max: number): { row: T; index: number }[] {
  if (xs.length <= max) return xs.map((row, index) => ({ row, index }));
  const idx = new Set<number>([0, 1, 2, xs.length - 3, xs.length - 2, xs.length - 1]);
  for (let k = 1; idx.size < max; k++) idx.add(Math.round((k * (xs.length - 1)) / (max - 5)));
  return [...idx].filter((i) => i >= 0 && i < xs.length).sort((a, b) => a - b).map((index) => ({ row: xs[index]!, index }));
}

function formatReport(r: Report): string {
  const out: string[] = [];
  out.push(`kmm-preflight controller benchmark (${r.mode}), ${r.date}`);
  out.push(`node ${r.node}, ${r.cpus} CPUs (${r.cpuModel}); the server, the registry and the benchmark share them`);
  out.push(`server pid ${r.serverPid ?? 'n/a'} (stand-alone, --modules-dir, SQLite); registry pid ${r.registryPid ?? 'n/a'}: ${r.registryVersion ?? 'docker-registry'} on loopback, plain HTTP`);
  out.push(`1-minute load average: ${r.loadAverage.start.toFixed(2)} at the start, ${r.loadAverage.end.toFixed(2)} at the end`);
  out.push(`command: ${r.command}`);
  if (r.setup) {
    const s = r.setup;
    out.push(
      `setup: ${r.plan.modules} Modules in ${r.plan.namespaces} namespaces, ${r.plan.images} images of one gzip layer with ${MODULES_PER_IMAGE} modules + modules.dep each; module objects compiled in ${s.buildSeconds.toFixed(1)} s, images pushed in ${s.pushSeconds.toFixed(1)} s`,
    );
    out.push(`       in the registry: layers ${fmtBytes(s.layerBytes)}, manifests ${fmtBytes(s.manifestBytes)}, configs ${fmtBytes(s.configBytes)} (${fmtBytes(s.moduleFileBytes)} of .ko files before gzip)`);
  }
  const m = r.measured;
  if (m) {
    out.push(
      `server: --log-level info (the server's default); controller started ${(m.controllerStartMs / 1000).toFixed(2)} s after the launch; then VmRSS ${mib(m.beforeCreate.vmRssKiB)}, VmHWM ${mib(m.beforeCreate.vmHwmKiB)}`,
    );
    if (r.plan.validationConcurrency !== null) out.push(`server option: --validation-concurrency ${r.plan.validationConcurrency}`);
    if (r.plan.serverNodeOptions !== null) out.push(`server NODE_OPTIONS: ${r.plan.serverNodeOptions}`);
    out.push('');
    out.push(`1. One PreflightValidation for ${KERNEL}: time from just before the create (POST) to the watch event of the write`);
    out.push(`   create answered           ${pad((m.createMs / 1000).toFixed(3), 8)} s`);
    out.push(`   counts.total == ${pad(r.plan.modules, 5)}     ${pad(m.totalMs === null ? 'n/a' : (m.totalMs / 1000).toFixed(3), 8)} s`);
    out.push(`   Verified=True             ${pad(m.verifiedMs === null ? 'n/a' : (m.verifiedMs / 1000).toFixed(3), 8)} s   (${r.plan.modules} Modules, ${m.verifiedMs === null ? 'n/a' : ((r.plan.modules * 1000) / m.verifiedMs).toFixed(0)} Modules/s)`);
    out.push(`   final status: ${Object.entries(m.finalStates).map(([k, v]) => `${k} ${v}`).join(', ')}; the object is ${fmtBytes(m.finalObjectBytes)} as JSON`);
    const o = Object.entries(m.metrics.outcomes);
    if (o.length > 0) out.push(`   verdicts (server /metrics): ${o.map(([k, v]) => `${k}: ${v}`).join(', ')}`);

    out.push('');
    out.push(`2. Status writes: MODIFIED events of the object on a watch from the create's resourceVersion (every write is an event)`);
    const bytesTotal = m.writes.reduce((a, w) => a + w.bytes, 0);
    out.push(
      `   ${m.writes.length} writes (${m.writesAfterVerified} of them after Verified=True, within ${r.plan.settleMs / 1000} s); ${m.transitions} real transitions of Module entries (Unknown→True: ${r.plan.modules} expected)`,
    );
    out.push(`   ${(m.writes.length / Math.max(1, m.transitions)).toFixed(3)} writes per transition, ${(m.transitions / Math.max(1, m.writes.length)).toFixed(1)} transitions per write; ${fmtBytes(bytesTotal)} of events in all`);
    out.push(`   server counter kmm_preflight_status_writes_total: ${m.metrics.statusWrites === null ? 'n/a (not exposed by this server)' : m.metrics.statusWrites}`);
    out.push(`   ${pad('write', 7)}${pad('at s', 9)}${pad('total', 7)}${pad('verified', 10)}${pad('pending', 9)}${pad('transitions', 13)}${pad('Verified', 10)}${pad('event', 12)}`);
    for (const { row: w, index } of pickRows(m.writes, 14)) {
      out.push(`   ${pad(index + 1, 7)}${pad((w.atMs / 1000).toFixed(3), 9)}${pad(w.total, 7)}${pad(w.verified, 10)}${pad(w.pending, 9)}${pad(w.transitions, 13)}${pad(w.verifiedCondition, 10)}${pad(fmtBytes(w.bytes), 12)}`);
    }

    out.push('');
    out.push('3. Server memory');
    out.push(`   before the create: VmRSS ${mib(m.beforeCreate.vmRssKiB)}, VmHWM ${mib(m.beforeCreate.vmHwmKiB)}`);
    out.push(
      `   after the run:     VmRSS ${mib(m.after.vmRssKiB)}, VmHWM ${mib(m.after.vmHwmKiB)}; VmRSS sampled every 100 ms peaked at ${m.sampledPeak ? `${mib(m.sampledPeak.rssKiB)}, ${(m.sampledPeak.atMs / 1000).toFixed(1)} s after the create` : 'n/a'}`,
    );

    out.push('');
    out.push('4. Registry traffic from the create to the end of the watch');
    const s = r.setup;
    out.push(`   sent by the registry (wchar of its process: HTTP headers and bodies): ${fmtBytes(m.registrySentBytes)}`);
    out.push(`   received by the server's registry client (kmm_preflight_registry_received_bytes): ${m.metrics.registryReceivedBytes === null ? 'n/a (not exposed by this server)' : fmtBytes(m.metrics.registryReceivedBytes)}`);
    if (s) {
      out.push(
        `   for reference: every layer once ${fmtBytes(s.layerBytes)}; every layer once per Module ${fmtBytes(s.layerBytes * MODULES_PER_IMAGE)}; one manifest GET per Module ${fmtBytes(s.manifestBytes * MODULES_PER_IMAGE)}`,
      );
    }

    out.push('');
    const c = m.cpu;
    out.push(
      `CPU from the create to the end of the watch (${c.wallSeconds.toFixed(1)} s wall, ${r.cpus} CPUs): server ${sec(c.serverSeconds)}, registry ${sec(c.registrySeconds)}, benchmark ${sec(c.benchSeconds)}, other processes ${sec(c.otherSeconds)}`,
    );
  }
  if (r.goals.length > 0) {
    out.push('');
    out.push('Goals');
    for (const g of r.goals) out.push(`  goal ${g.goal}: ${g.value} -> ${g.met ? 'goal met' : 'goal missed'}`);
  }
  if (r.mode === 'quick') out.push(`  (quick run: ${r.plan.modules} Modules; the goals are set for ${1000} — see the full run)`);
  out.push('');
  if (r.error) out.push(`ERROR: ${r.error}`);
  out.push(`total ${r.totalSeconds.toFixed(1)} s`);
  return out.join('\n') + '\n';
}

// ---- Main ------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const t0 = Date.now();
  const startedAt = new Date(t0).toISOString();
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  const command = ['node', 'bench/controller.ts', ...process.argv.slice(2)].map(quote).join(' ');
  const loadStart = loadavg()[0] ?? 0;
  let registry: TestRegistry | undefined;
  let server: TestServer | undefined;
  let tmp: string | undefined;
  let serverPid: number | undefined;
  let registryPid: number | undefined;
  let registryVersion: string | null = null;
  let setupResult: Setup | undefined;
  let measured: Measured | undefined;
  let error: string | undefined;
  let interrupted: NodeJS.Signals | undefined;

  const cleanup = async () => {
    const s = server;
    const r = registry;
    const d = tmp;
    server = registry = tmp = undefined;
    if (s) await s.stop().catch((e: unknown) => progress(`stopping the server failed: ${String(e)}`));
    if (r) await r.stop().catch((e: unknown) => progress(`stopping the registry failed: ${String(e)}`));
    if (d) await rm(d, { recursive: true, force: true }).catch((e: unknown) => progress(`removing ${d} failed: ${String(e)}`));
  };
  // A hard stop in case something hangs outside the bounded loops (everything is still removed).
  const watchdog = setTimeout(() => {
    progress(`the run exceeded ${PLAN.totalLimitMs / 1000} s; stopping`);
    void cleanup().finally(() => process.exit(1));
  }, PLAN.totalLimitMs + 30_000);
  watchdog.unref();
  // Ctrl-C or kill: stop the server and the registry now (the run then fails and reports); exit
  // anyway if that does not happen within 15 s.
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted = sig;
    stopRequested = sig;
    progress(`${sig}: stopping`);
    void cleanup().finally(() => setTimeout(() => process.exit(130), 15_000).unref());
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const { startRegistry } = await import('../test/helpers/registry.ts');
    const { startTestServer } = await import('../test/helpers/server.ts');
    try {
      registryVersion = execFileSync('docker-registry', ['--version'], { encoding: 'utf8', timeout: 10_000 }).split('\n')[0]!.trim();
    } catch {
      // reported as docker-registry
    }
    tmp = await mkdtemp(join(tmpdir(), 'kmm-bench-controller-'));
    progress(`starting docker-registry (${PLAN.mode} run)`);
    registry = await startRegistry();
    registryPid = findRegistryPid();
    if (registryPid === undefined) progress('warning: could not find the registry pid; its CPU and bytes are reported as n/a');
    const defs = moduleDefs(PLAN);
    setupResult = await setup(PLAN, registry, tmp, defs);
    if (interrupted) throw new Error(`interrupted by ${interrupted}`);

    progress(`starting the server with --modules-dir (${PLAN.modules} Module manifests)`);
    const serverArgs = ['--modules-dir', setupResult.manifestsDir, '--log-level', 'info'];
    if (PLAN.validationConcurrency !== null) serverArgs.push('--validation-concurrency', String(PLAN.validationConcurrency));
    const serverNodeOptions = PLAN.serverNodeOptions ?? undefined;
    const savedNodeOptions = process.env['NODE_OPTIONS'];
    if (serverNodeOptions !== undefined) process.env['NODE_OPTIONS'] = serverNodeOptions;
    const launchedAt = performance.now();
    try {
      server = await startTestServer(serverArgs);
    } finally {
      if (serverNodeOptions !== undefined) {
        if (savedNodeOptions === undefined) delete process.env['NODE_OPTIONS'];
        else process.env['NODE_OPTIONS'] = savedNodeOptions;
      }
    }
    serverPid = findServerPid(server);
    if (serverPid === undefined) progress('warning: could not find the server pid; memory and server CPU are reported as n/a');
    const tls: Tls = {
      ca: await readFile(join(server.certDir, 'ca.crt')),
      cert: await readFile(join(server.certDir, 'admin.crt')),
      key: await readFile(join(server.certDir, 'admin.key')),
    };
    measured = await measure(PLAN, server, tls, serverPid, registryPid, launchedAt);
    const warnings = logLines(server.output(), 'status write failed; retrying').length;
    if (warnings > 0) progress(`note: the server logged ${warnings} failed status writes (retried)`);
  } catch (err) {
    error = err instanceof Error ? err.message : String(err);
    if (interrupted && !error.startsWith('interrupted')) error = `interrupted by ${interrupted} (${error})`;
    progress(`error: ${error}`);
    if (server && !interrupted) progress(`server output (tail):\n${server.output().slice(-2000)}`);
  } finally {
    progress('stopping the server and the registry');
    await cleanup();
    clearTimeout(watchdog);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }

  const report: Report = {
    date: startedAt,
    command,
    mode: PLAN.mode,
    node: process.version,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    loadAverage: { start: round(loadStart), end: round(loadavg()[0] ?? 0) },
    plan: PLAN,
    serverPid: serverPid ?? null,
    registryPid: registryPid ?? null,
    registryVersion,
    ...(setupResult ? { setup: setupResult } : {}),
    ...(measured ? { measured } : {}),
    goals: goals(PLAN, measured),
    totalSeconds: round((Date.now() - t0) / 1000, 1),
    ...(error !== undefined ? { error } : {}),
  };
  process.stdout.write(args.json ? `${JSON.stringify(report, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n` : formatReport(report));
  return interrupted ? 130 : error === undefined ? 0 : 1;
}

process.exitCode = await main();
