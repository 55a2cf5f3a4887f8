/**
 * Benchmark of kmm-preflight's Image stage (`src/engine/image-stage.ts`) against a real registry:
 * Debian's docker-registry on loopback (`startRegistry()` from test/helpers/registry.ts), side by
 * side with the naive check a person would make: `skopeo copy docker://… dir:…`, then
 * `tar -tzf` of each layer until the module shows up.
 *
 *   node bench/image-stage.ts           full run (300 MiB images, 500 Modules; about 90 s on 2 cores)
 *   node bench/image-stage.ts --quick   CI smoke run (40 MiB images, 100 Modules; about 15 s)
 *   node bench/image-stage.ts --json    one JSON object on stdout instead of the tables
 *   node bench/image-stage.ts --concurrency=32   Modules validated at once in phase 4
 *   node bench/image-stage.ts --layer-concurrency=2   the stage's limits.layerConcurrency (default: its own)
 *   node bench/image-stage.ts --worker-node-options="--cpu-prof --cpu-prof-dir=/tmp/prof"
 *                                       NODE_OPTIONS of the validating children only (profiling)
 *
 * Phases: (1) cold validation of a 5-layer gzip image with the module in the top layer and of one
 * with the module in the bottom layer (and, for reference, of one with the module alone in a small
 * sixth layer), kmm-preflight vs skopeo+tar: wall time and bytes; (2) a second validation of the
 * same images with the layer scans cached (same process, memory cache; and a new process with the
 * disk cache, as `check --cache-dir` does); (3) the peak memory (VmHWM) of the validating process,
 * also for an image with one large layer; (4) many Modules, each with its own small image,
 * validated with the engine (`validateModuleForKernel`) at a set concurrency.
 *
 * Every kmm-preflight validation runs in a child process (this file with `--worker=<job file>`),
 * so its memory and CPU are its own. Filler data is random (incompressible), generated in 1 MiB
 * chunks and streamed through gzip to files, then streamed to the registry: no layer is ever held
 * in memory whole.
 *
 * Exits 0 when every phase ran (a missed goal is reported, not failed), 1 on an error (a
 * validation that did not conclude `True`, a tool that failed, a phase over its time limit), 130
 * when interrupted. The registry, the children and the temporary files are removed however the run
 * ends. See bench/README.md.
 */
import { benchCommandLine, clockTicks, findRegistryPid, machineCpuSeconds, pad, progress, round, procStatusKiB, procCpuSeconds } from './lib.ts';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createGzip, gzipSync } from 'node:zlib';
import type { RegistryClient } from '../src/registry/types.ts';

const execFileP = promisify(execFile);

const KERNEL = '6.1.0-18-amd64';
const VERMAGIC = `${KERNEL} SMP preempt mod_unload modversions `;
const DIR_NAME = '/opt';
const PLATFORM = { os: 'linux', architecture: 'amd64' } as const;
const MiB = 1024 * 1024;
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
const OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';

const GOAL_TOP_RATIO = 5; // module on top: at least 5x less time and bytes than skopeo+tar
const GOAL_BOTTOM_RATIO = 1.2; // module at the bottom: at most 1.2x the naive time
const GOAL_CACHED_MS = 50; // second validation
const GOAL_PEAK_MIB = 200; // VmHWM of the validating process
const GOAL_MODULES_S = 30; // phase 4 wall time

// ---- Options ---------------------------------------------------------------------------------

const USAGE =
  'usage: node bench/image-stage.ts [--quick] [--json] [--concurrency=N] [--layer-concurrency=N] [--worker-node-options="<NODE_OPTIONS of the validating children>"]\n';

function parseCommandLine() {
  return benchCommandLine('bench/image-stage.ts', USAGE, {
    concurrency: { type: 'string', default: '32' },
    worker: { type: 'string' },
    'worker-node-options': { type: 'string' },
    'layer-concurrency': { type: 'string' },
  }, (values) => {
    const concurrency = Number(values.concurrency);
    if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 256) throw new Error('--concurrency must be a whole number from 1 to 256');
    const layerConcurrency = values['layer-concurrency'] === undefined ? undefined : Number(values['layer-concurrency']);
    if (layerConcurrency !== undefined && (!Number.isInteger(layerConcurrency) || layerConcurrency < 1 || layerConcurrency > 16)) {
      throw new Error('--layer-concurrency must be a whole number from 1 to 16');
    }
    return { ...values, concurrency, layerConcurrency };
  });
}

interface Plan {
  readonly mode: 'full' | 'quick';
  /** Layers of the two big images. */
  readonly layers: number;
  /** Random filler per layer, MiB (in files of `fileMiB`). */
  readonly layerMiB: number;
  readonly fileMiB: number;
  /** Size of the one-layer image of phase 3. */
  readonly bigLayerMiB: number;
  /** Cold runs per image and tool (the median is reported). */
  readonly reps: number;
  /** Phase 4. */
  readonly modules: number;
  readonly concurrency: number;
  /** The Image stage's `limits.layerConcurrency`; undefined: the stage's default. */
  readonly layerConcurrency: number | undefined;
  /** Pushes at once while setting up phase 4. */
  readonly pushConcurrency: number;
  /** Limit of one child (a validation, skopeo, tar). */
  readonly stepTimeoutMs: number;
  /** The whole run fails past this. */
  readonly totalLimitMs: number;
}

// ---- Small helpers ---------------------------------------------------------------------------

const mib = (bytes: number) => bytes / MiB;

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}




/** CPU seconds of this process and its reaped children (utime, stime, cutime, cstime), or null. */
function selfAndChildrenCpuSeconds(): number | null {
  try {
    const stat = readFileSync('/proc/self/stat', 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / clockTicks;
  } catch {
    return null;
  }
}


/** Runs `fn` over `items` with at most `limit` at once; results in input order. */
async function pool<T, R>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    for (;;) {
      const i = next++;
      if (i >= items.length) return;
      results[i] = await fn(items[i]!, i);
    }
  });
  await Promise.all(workers);
  return results;
}

// ---- Layers: tar written by hand (streamed), gzip, digests ------------------------------------

type TarEntry =
  | { readonly kind: 'dir'; readonly name: string }
  | { readonly kind: 'file'; readonly name: string; readonly data: Buffer }
  | { readonly kind: 'random'; readonly name: string; readonly size: number };

function octal(n: number, width: number): string {
  return `${n.toString(8).padStart(width - 1, '0')}\0`;
}

function tarHeader(name: string, size: number, type: '0' | '5', mode: number): Buffer {
  if (Buffer.byteLength(name) > 100) throw new Error(`tar entry name over 100 bytes: ${name}`);
  const h = Buffer.alloc(512);
  h.write(name, 0, 100, 'utf8');
  h.write(octal(mode, 8), 100, 'ascii');
  h.write(octal(0, 8), 108, 'ascii');
  h.write(octal(0, 8), 116, 'ascii');
  h.write(octal(size, 12), 124, 'ascii');
  h.write(octal(1_700_000_000, 12), 136, 'ascii');
  h.write('        ', 148, 'ascii');
  h.write(type, 156, 'ascii');
  h.write('ustar\0', 257, 'ascii');
  h.write('00', 263, 'ascii');
  h.write('root', 265, 'ascii');
  h.write('root', 297, 'ascii');
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${octal(sum, 7)} `, 148, 'ascii');
  return h;
}

/** A POSIX ustar stream of `entries`; random files are produced 1 MiB at a time. */
async function* tarStream(entries: readonly TarEntry[]): AsyncGenerator<Buffer> {
  for (const e of entries) {
    if (e.kind === 'dir') {
      yield tarHeader(e.name.endsWith('/') ? e.name : `${e.name}/`, 0, '5', 0o755);
      continue;
    }
    const size = e.kind === 'file' ? e.data.length : e.size;
    yield tarHeader(e.name, size, '0', 0o644);
    if (e.kind === 'file') yield e.data;
    else for (let left = size; left > 0; left -= MiB) yield randomBytes(Math.min(MiB, left));
    const pad = (512 - (size % 512)) % 512;
    if (pad > 0) yield Buffer.alloc(pad);
  }
  yield Buffer.alloc(1024);
}

function tap(onChunk: (c: Buffer) => void): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      onChunk(chunk);
      cb(null, chunk);
    },
  });
}

interface Blob {
  readonly digest: string;
  readonly size: number;
}

interface Layer extends Blob {
  readonly diffId: string;
  readonly uncompressedSize: number;
  /** Where the gzip blob is (big layers) ... */
  readonly file?: string;
  /** ... or the blob itself (small layers). */
  readonly data?: Buffer;
  readonly label: string;
}

/** Streams a gzip layer of `entries` to `file`, hashing as it goes. */
async function writeLayerFile(file: string, entries: readonly TarEntry[], label: string, signal: AbortSignal): Promise<Layer> {
  const diff = createHash('sha256');
  const comp = createHash('sha256');
  let uncompressedSize = 0;
  await pipeline(
    Readable.from(tarStream(entries), { objectMode: false }),
    tap((c) => {
      diff.update(c);
      uncompressedSize += c.length;
    }),
    createGzip({ level: 1 }),
    tap((c) => comp.update(c)),
    createWriteStream(file),
    { signal },
  );
  const { size } = await stat(file);
  return { digest: `sha256:${comp.digest('hex')}`, diffId: `sha256:${diff.digest('hex')}`, size, uncompressedSize, file, label };
}

/** A small gzip layer in memory. */
async function layerBuffer(entries: readonly TarEntry[], label: string): Promise<Layer> {
  const chunks: Buffer[] = [];
  for await (const c of tarStream(entries)) chunks.push(c);
  const tarBytes = Buffer.concat(chunks);
  const data = gzipSync(tarBytes, { level: 6 });
  return {
    digest: `sha256:${createHash('sha256').update(data).digest('hex')}`,
    diffId: `sha256:${createHash('sha256').update(tarBytes).digest('hex')}`,
    size: data.length,
    uncompressedSize: tarBytes.length,
    data,
    label,
  };
}

/** Directories and files of a module as KMM's images have them: `<dirName>/lib/modules/<kernel>/…`. */
function moduleEntries(name: string, ko: Buffer): TarEntry[] {
  const root = DIR_NAME.replace(/^\/+/, '');
  const kdir = `${root}/lib/modules/${KERNEL}`;
  return [
    { kind: 'dir', name: `${root}/` },
    { kind: 'dir', name: `${root}/lib/` },
    { kind: 'dir', name: `${root}/lib/modules/` },
    { kind: 'dir', name: `${kdir}/` },
    { kind: 'dir', name: `${kdir}/extra/` },
    { kind: 'file', name: `${kdir}/extra/${name}.ko`, data: ko },
    { kind: 'file', name: `${kdir}/modules.dep`, data: Buffer.from(`extra/${name}.ko:\n`) },
  ];
}

function modulePath(name: string): string {
  return `${DIR_NAME.replace(/^\/+/, '')}/lib/modules/${KERNEL}/extra/${name}.ko`;
}

/** Random filler files under usr/share/bench-filler/<tag>/ (after `opt/` in a builder's lexical order). */
function fillerEntries(tag: string, totalMiB: number, fileMiB: number): TarEntry[] {
  const dir = `usr/share/bench-filler/${tag}`;
  const out: TarEntry[] = [
    { kind: 'dir', name: 'usr/' },
    { kind: 'dir', name: 'usr/share/' },
    { kind: 'dir', name: 'usr/share/bench-filler/' },
    { kind: 'dir', name: `${dir}/` },
  ];
  let left = totalMiB * MiB;
  for (let i = 0; left > 0; i++) {
    const size = Math.min(left, fileMiB * MiB);
    out.push({ kind: 'random', name: `${dir}/part-${String(i).padStart(3, '0')}.bin`, size });
    left -= size;
  }
  return out;
}

// ---- Worker (child process): one kmm-preflight validation job ---------------------------------

interface ImageJob {
  readonly kind: 'image';
  readonly image: string;
  readonly moduleName: string;
  /** Digests of the image's layers, to tell layer blobs from the config blob. */
  readonly layerDigests: readonly string[];
  /** Validations of the same image one after the other in this process (1 = cold only). */
  readonly runs: number;
  /** Layer-scan cache: in memory, or on disk in `dir` (shared between processes). */
  readonly cache: { readonly kind: 'memory' } | { readonly kind: 'disk'; readonly dir: string };
  readonly layerConcurrency?: number;
}

interface ModulesJob {
  readonly kind: 'modules';
  readonly registryHost: string;
  readonly concurrency: number;
  readonly layerConcurrency?: number;
  /** Module i uses image `<registryHost>/bench/small-<i>:${KERNEL_FULL_VERSION}` and module `<name>`. */
  readonly modules: readonly { readonly name: string; readonly repo: string }[];
}

type Job = ImageJob | ModulesJob;

interface RunFigures {
  readonly status: string;
  readonly code: string;
  readonly reason: string;
  readonly ms: number;
  /** registry.bytesReceived delta over the whole run. */
  readonly bytes: number;
  /** Of which during resolveImage (manifest, index). */
  readonly manifestBytes: number;
  /** Layer blobs opened, and their compressed sizes. */
  readonly layerBlobsOpened: number;
  readonly layerBlobBytes: number;
}

interface ImageJobResult {
  readonly kind: 'image';
  readonly runs: readonly RunFigures[];
  /** VmHWM after the imports, before the first validation; and at the end. KiB. CPU from after the imports. */
  readonly vmHwmStartKiB: number | null;
  readonly vmHwmEndKiB: number | null;
  readonly cpuSeconds: number;
  /** Peaks of process.memoryUsage() sampled every 10 ms during the runs, bytes. */
  readonly sampled: MemorySample;
}

interface MemorySample {
  readonly rss: number;
  readonly heapUsed: number;
  readonly heapTotal: number;
  readonly external: number;
  readonly arrayBuffers: number;
}

/** Tracks the peaks of process.memoryUsage() (each field on its own) until stopped. */
function memorySampler(everyMs: number): () => MemorySample {
  const peak = { rss: 0, heapUsed: 0, heapTotal: 0, external: 0, arrayBuffers: 0 };
  const sample = () => {
    const m = process.memoryUsage();
    peak.rss = Math.max(peak.rss, m.rss);
    peak.heapUsed = Math.max(peak.heapUsed, m.heapUsed);
    peak.heapTotal = Math.max(peak.heapTotal, m.heapTotal);
    peak.external = Math.max(peak.external, m.external);
    peak.arrayBuffers = Math.max(peak.arrayBuffers, m.arrayBuffers);
  };
  sample();
  const timer = setInterval(sample, everyMs);
  return () => {
    clearInterval(timer);
    sample();
    return { ...peak };
  };
}

interface ModulesJobResult {
  readonly kind: 'modules';
  readonly ms: number;
  readonly bytes: number;
  readonly counts: Readonly<Record<string, number>>;
  readonly firstFailures: readonly string[];
  readonly vmHwmStartKiB: number | null;
  readonly vmHwmEndKiB: number | null;
  readonly cpuSeconds: number;
}

type JobResult = ImageJobResult | ModulesJobResult;

/** Starts the worker's result line on stdout (other output, e.g. from NODE_OPTIONS, is ignored). */
const RESULT_MARK = '@@kmm-bench-result ';

async function worker(jobFile: string): Promise<void> {
  const job = JSON.parse(await readFile(jobFile, 'utf8')) as Job;
  const { createRegistryClient } = await import('../src/registry/client.ts');
  const { createImageStage } = await import('../src/engine/image-stage.ts');
  const { createDiskLayerCache, createMemoryLayerCache } = await import('../src/engine/layer-cache.ts');
  const cpu0 = process.cpuUsage();
  const registry = createRegistryClient({ userAgent: 'kmm-preflight-bench' });

  if (job.kind === 'image') {
    // Counts what the stage asks of the registry; the stage sees the same client otherwise.
    const layers = new Set(job.layerDigests);
    let manifestBytes = 0;
    let layerBlobsOpened = 0;
    let layerBlobBytes = 0;
    const counting: RegistryClient = {
      resolveImage: async (...a) => {
        const before = registry.bytesReceived;
        try {
          return await registry.resolveImage(...a);
        } finally {
          manifestBytes += registry.bytesReceived - before;
        }
      },
      openBlob: (...a) => {
        if (layers.has(a[1].digest)) {
          layerBlobsOpened++;
          layerBlobBytes += a[1].size;
        }
        return registry.openBlob(...a);
      },
      get bytesReceived() {
        return registry.bytesReceived;
      },
    };
    const cache = job.cache.kind === 'disk' ? createDiskLayerCache({ dir: job.cache.dir }) : createMemoryLayerCache();
    const stage = createImageStage({ registry: counting, cache, ...(job.layerConcurrency ? { limits: { layerConcurrency: job.layerConcurrency } } : {}) });
    const vmHwmStartKiB = procStatusKiB('self', 'VmHWM');
    const stopSampler = memorySampler(10);
    const runs: RunFigures[] = [];
    for (let i = 0; i < job.runs; i++) {
      manifestBytes = layerBlobsOpened = layerBlobBytes = 0;
      const b0 = registry.bytesReceived;
      const t0 = performance.now();
      const outcome = await stage.run({
        image: job.image,
        moduleName: job.moduleName,
        dirName: DIR_NAME,
        kernel: KERNEL,
        access: { insecure: true },
        platform: PLATFORM,
        signal: AbortSignal.timeout(120_000),
      });
      const ms = performance.now() - t0;
      runs.push({
        status: outcome.status,
        code: outcome.code,
        reason: outcome.reason,
        ms: round(ms),
        bytes: registry.bytesReceived - b0,
        manifestBytes,
        layerBlobsOpened,
        layerBlobBytes,
      });
    }
    const sampled = stopSampler();
    const vmHwmEndKiB = procStatusKiB('self', 'VmHWM');
    const cpu = process.cpuUsage(cpu0);
    await registry.close();
    const result: ImageJobResult = { kind: 'image', runs, vmHwmStartKiB, vmHwmEndKiB, cpuSeconds: round((cpu.user + cpu.system) / 1e6), sampled };
    process.stdout.write(`${RESULT_MARK}${JSON.stringify(result)}\n`);
    return;
  }

  const { parseModule } = await import('../src/engine/module.ts');
  const { validateModuleForKernel } = await import('../src/engine/validate.ts');
  const stage = createImageStage({
    registry,
    cache: createMemoryLayerCache(),
    ...(job.layerConcurrency ? { limits: { layerConcurrency: job.layerConcurrency } } : {}),
  });
  const modules = job.modules.map((m, i) => {
    const parsed = parseModule({
      apiVersion: 'kmm.sigs.x-k8s.io/v1beta1',
      kind: 'Module',
      metadata: { name: `bench-${i}`, namespace: 'bench' },
      spec: {
        selector: { 'kubernetes.io/os': 'linux' },
        moduleLoader: {
          container: {
            modprobe: { moduleName: m.name },
            registryTLS: { insecure: true },
            kernelMappings: [{ regexp: '^.+$', containerImage: `${job.registryHost}/${m.repo}:\${KERNEL_FULL_VERSION}` }],
          },
        },
      },
    });
    if (!parsed.ok) throw new Error(`bench Module ${i} does not parse: ${parsed.errors.join('; ')}`);
    return parsed.module;
  });
  const vmHwmStartKiB = procStatusKiB('self', 'VmHWM');
  const counts: Record<string, number> = {};
  const firstFailures: string[] = [];
  const deadline = AbortSignal.timeout(5 * 60_000);
  const b0 = registry.bytesReceived;
  const t0 = performance.now();
  await pool(modules, job.concurrency, async (m) => {
    const v = await validateModuleForKernel(m, KERNEL, { imageStage: stage, platform: PLATFORM, credentialsFor: async () => undefined }, deadline);
    counts[v.status] = (counts[v.status] ?? 0) + 1;
    if (v.status !== 'True' && firstFailures.length < 5) firstFailures.push(`${v.name}: ${v.status} ${v.code}: ${v.reason}`);
  });
  const ms = performance.now() - t0;
  const bytes = registry.bytesReceived - b0;
  const vmHwmEndKiB = procStatusKiB('self', 'VmHWM');
  const cpu = process.cpuUsage(cpu0);
  await registry.close();
  const result: ModulesJobResult = {
    kind: 'modules',
    ms: round(ms),
    bytes,
    counts,
    firstFailures,
    vmHwmStartKiB,
    vmHwmEndKiB,
    cpuSeconds: round((cpu.user + cpu.system) / 1e6),
  };
  process.stdout.write(`${RESULT_MARK}${JSON.stringify(result)}\n`);
}

// ---- Parent: children, registry, naive tools ---------------------------------------------------

const THIS_FILE = fileURLToPath(import.meta.url);
/** NODE_OPTIONS for the validating children (profiling), from --worker-node-options. */
let workerNodeOptions: string | undefined;
const children = new Set<ChildProcess>();

interface ChildRun<T> {
  readonly result: T;
  /** From spawn to exit, ms (Node start-up and imports included). */
  readonly processMs: number;
}

/** Runs a worker job in a child process with a time limit. */
async function runWorker<T extends JobResult>(tmp: string, job: Job, timeoutMs: number, signal: AbortSignal): Promise<ChildRun<T>> {
  const file = join(tmp, `job-${randomBytes(6).toString('hex')}.json`);
  await writeFile(file, JSON.stringify(job));
  const t0 = performance.now();
  const env = workerNodeOptions === undefined ? process.env : { ...process.env, NODE_OPTIONS: workerNodeOptions };
  const child = spawn(process.execPath, [THIS_FILE, `--worker=${file}`], { stdio: ['ignore', 'pipe', 'pipe'], env });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-8000)));
  const kill = () => child.kill('SIGKILL');
  const timer = setTimeout(kill, timeoutMs);
  signal.addEventListener('abort', kill, { once: true });
  try {
    const [code, sig] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (c, s) => resolve([c, s]));
    });
    const processMs = performance.now() - t0;
    if (signal.aborted) throw signal.reason;
    if (code !== 0) {
      const why = sig ? (processMs >= timeoutMs ? `was killed after its ${timeoutMs / 1000} s limit` : `was killed by ${sig}`) : `exited with ${code}`;
      throw new Error(`the validating child process (${job.kind} job) ${why}:\n${stderr.trim()}`);
    }
    const line = stdout.split('\n').findLast((l) => l.startsWith(RESULT_MARK));
    if (line === undefined) throw new Error(`the validating child process (${job.kind} job) printed no result:\n${stderr.trim()}`);
    return { result: JSON.parse(line.slice(RESULT_MARK.length)) as T, processMs };
  } finally {
    clearTimeout(timer);
    signal.removeEventListener('abort', kill);
    children.delete(child);
    await rm(file, { force: true });
  }
}


interface NaiveResult {
  readonly found: boolean;
  readonly copyMs: number;
  readonly searchMs: number;
  readonly ms: number;
  /** Bytes skopeo wrote to the dir: manifest, config and every layer, as downloaded. */
  readonly bytes: number;
  readonly layersListed: number;
}

/**
 * The naive check: `skopeo copy docker://… dir:…`, then `tar -tzf` of each layer in the order of
 * the manifest (bottom first, as `jq -r '.layers[].digest'` lists them) until the module is found.
 */
async function naiveCheck(tools: Tools, tmp: string, image: string, wanted: string, timeoutMs: number, signal: AbortSignal): Promise<NaiveResult> {
  const dir = join(tmp, `skopeo-${randomBytes(6).toString('hex')}`);
  try {
    const t0 = performance.now();
    await execFileP(tools.skopeo, ['copy', '--quiet', '--src-tls-verify=false', `docker://${image}`, `dir:${dir}`], { timeout: timeoutMs, signal });
    const t1 = performance.now();
    const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')) as { layers: { digest: string }[] };
    let found = false;
    let layersListed = 0;
    for (const layer of manifest.layers) {
      const { stdout } = await execFileP(tools.tar, ['-tzf', join(dir, layer.digest.replace(/^sha256:/, ''))], {
        timeout: timeoutMs,
        signal,
        maxBuffer: 64 * MiB,
      });
      layersListed++;
      if (stdout.split('\n').some((l) => l.replace(/^\.?\//, '') === wanted)) {
        found = true;
        break;
      }
    }
    const t2 = performance.now();
    let bytes = 0;
    for (const f of await readdir(dir)) if (f !== 'version') bytes += (await stat(join(dir, f))).size;
    return { found, copyMs: round(t1 - t0), searchMs: round(t2 - t1), ms: round(t2 - t0), bytes, layersListed };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

interface Tools {
  readonly skopeo: string;
  readonly skopeoVersion: string;
  readonly tar: string;
  readonly tarVersion: string;
  readonly registryVersion: string;
}

// ---- Parent: image setup ----------------------------------------------------------------------

interface PushedImage {
  readonly name: string;
  /** `127.0.0.1:PORT/repo:tag`. */
  readonly ref: string;
  readonly moduleName: string;
  readonly layers: readonly Layer[];
  readonly totalLayerBytes: number;
  /** Index (0 = bottom) of the layer with the module. */
  readonly moduleLayer: number;
}

type Pusher = import('../src/registry/client.ts').RegistryHttpClient;

async function pushLayeredImage(client: Pusher, host: string, repo: string, tag: string, layers: readonly Layer[], signal: AbortSignal): Promise<string> {
  const { parseImageReference } = await import('../src/image/reference.ts');
  const ref = parseImageReference(`${host}/${repo}:${tag}`);
  const access = { insecure: true };
  for (const l of layers) {
    await client.pushBlob(ref, l.data ?? createReadStream(l.file!), l.digest, access, { signal });
  }
  const config = Buffer.from(
    JSON.stringify({
      architecture: PLATFORM.architecture,
      os: PLATFORM.os,
      config: { Labels: { 'org.opencontainers.image.title': `kmm-preflight bench ${repo}` } },
      rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
    }),
  );
  const configDigest = `sha256:${createHash('sha256').update(config).digest('hex')}`;
  await client.pushBlob(ref, config, configDigest, access, { signal });
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      config: { mediaType: OCI_CONFIG, digest: configDigest, size: config.length },
      layers: layers.map((l) => ({ mediaType: OCI_LAYER_GZIP, digest: l.digest, size: l.size })),
    }),
  );
  await client.pushManifest(ref, manifest, OCI_MANIFEST, access, { signal });
  return `${host}/${repo}:${tag}`;
}

interface BigImages {
  readonly top: PushedImage;
  readonly bottom: PushedImage;
  /** 5 filler layers and a small module-only layer on top: how KMM images are usually built. */
  readonly smallTop: PushedImage;
  /** One layer of `bigLayerMiB`, the module after the filler. */
  readonly oneLayer: PushedImage;
  readonly generateSeconds: number;
  readonly pushSeconds: number;
}

async function setupBigImages(plan: Plan, tmp: string, host: string, client: Pusher, ko: (name: string) => Promise<Buffer>, signal: AbortSignal): Promise<BigImages> {
  const dir = join(tmp, 'layers');
  await mkdir(dir, { recursive: true });
  const t0 = performance.now();
  const fillers: Layer[] = [];
  for (let i = 0; i < plan.layers; i++) {
    signal.throwIfAborted();
    fillers.push(await writeLayerFile(join(dir, `filler-${i}.tar.gz`), fillerEntries(`layer-${i}`, plan.layerMiB, plan.fileMiB), `filler ${i}`, signal));
    progress(`generated filler layer ${i + 1}/${plan.layers}: ${mib(fillers[i]!.size).toFixed(1)} MiB gzip`);
  }
  const bigName = 'kmod_bench_big';
  // The module and its modules.dep, then as much filler as the other layers (a builder writes
  // `opt/` before `usr/`).
  const moduleLayer = await writeLayerFile(
    join(dir, 'module.tar.gz'),
    [...moduleEntries(bigName, await ko(bigName)), ...fillerEntries('module-layer', plan.layerMiB, plan.fileMiB)],
    'module + filler',
    signal,
  );
  const smallModuleLayer = await layerBuffer(moduleEntries(bigName, await ko(bigName)), 'module only');
  const oneLayer = await writeLayerFile(
    join(dir, 'one-layer.tar.gz'),
    [...fillerEntries('one-layer', plan.bigLayerMiB, plan.fileMiB), ...moduleEntries(bigName, await ko(bigName))],
    'filler + module',
    signal,
  );
  const generateSeconds = (performance.now() - t0) / 1000;
  progress(`generated the layers in ${generateSeconds.toFixed(1)} s; pushing`);

  const t1 = performance.now();
  const lower = fillers.slice(0, plan.layers - 1);
  const mk = async (name: string, repo: string, layers: Layer[], moduleLayerIndex: number): Promise<PushedImage> => {
    const ref = await pushLayeredImage(client, host, repo, KERNEL, layers, signal);
    return { name, ref, moduleName: bigName, layers, totalLayerBytes: layers.reduce((a, l) => a + l.size, 0), moduleLayer: moduleLayerIndex };
  };
  const top = await mk('module on top', 'bench/top', [...lower, moduleLayer], plan.layers - 1);
  const bottom = await mk('module at the bottom', 'bench/bottom', [moduleLayer, ...lower], 0);
  const smallTop = await mk('module alone in a small top layer', 'bench/small-top', [...fillers, smallModuleLayer], plan.layers);
  const one = await mk('one large layer', 'bench/one-layer', [oneLayer], 0);
  const pushSeconds = (performance.now() - t1) / 1000;
  progress(`pushed 4 images in ${pushSeconds.toFixed(1)} s`);
  // The registry has them now; the local copies are not needed any more.
  await rm(dir, { recursive: true, force: true });
  return { top, bottom, smallTop, oneLayer: one, generateSeconds, pushSeconds };
}

// ---- Parent: phases -------------------------------------------------------------------------

interface KmmCold {
  /** Median over the repetitions. */
  readonly ms: number;
  readonly allMs: readonly number[];
  readonly processMs: number;
  readonly bytes: number;
  readonly layerBlobsOpened: number;
  readonly layerBlobBytes: number;
  readonly status: string;
  readonly code: string;
  readonly cpuSeconds: number;
  readonly registryCpuSeconds: number | null;
  readonly vmHwmStartKiB: number | null;
  readonly vmHwmKiB: number | null;
  readonly sampled: MemorySample;
}

interface NaiveCold {
  readonly ms: number;
  readonly allMs: readonly number[];
  readonly copyMs: number;
  readonly searchMs: number;
  readonly bytes: number;
  readonly layersListed: number;
  readonly registryCpuSeconds: number | null;
}

interface CachedRun {
  readonly how: string;
  readonly image: string;
  /** Median over the repetitions. */
  readonly ms: number;
  readonly allMs: readonly number[];
  /** registry.bytesReceived delta (manifest included). */
  readonly bytes: number;
  readonly manifestBytes: number;
  /** Layer blobs opened and their bytes: 0 when every scan came from the cache. */
  readonly layerBlobsOpened: number;
  readonly layerBytes: number;
  readonly status: string;
}

interface ColdRow {
  readonly image: string;
  readonly layers: number;
  readonly imageBytes: number;
  readonly largestLayerBytes: number;
  readonly moduleLayer: string;
  /** Compressed size of the top layer. */
  readonly topLayerBytes: number;
  readonly kmm: KmmCold;
  readonly naive?: NaiveCold;
}

interface MemoryRow {
  readonly image: string;
  readonly layers: number;
  readonly largestLayerBytes: number;
  /** Compressed layer bytes that went through the validating process. */
  readonly streamedBytes: number;
  readonly vmHwmStartKiB: number | null;
  readonly vmHwmKiB: number | null;
  /** Sampled peaks (process.memoryUsage() every 10 ms) of the process with the highest VmHWM. */
  readonly sampled: MemorySample;
}

interface ModulesPhase {
  readonly modules: number;
  readonly concurrency: number;
  readonly layers: { readonly one: number; readonly two: number };
  readonly imageBytes: number;
  readonly setupSeconds: number;
  readonly ms: number;
  readonly perSecond: number;
  readonly bytes: number;
  readonly counts: Readonly<Record<string, number>>;
  readonly firstFailures: readonly string[];
  readonly cpuSeconds: number;
  readonly registryCpuSeconds: number | null;
  readonly vmHwmKiB: number | null;
  readonly processMs: number;
}

interface Goal {
  readonly goal: string;
  readonly value: string;
  readonly met: boolean;
}

interface Report {
  readonly date: string;
  readonly command: string;
  readonly mode: Plan['mode'];
  readonly node: string;
  readonly cpus: number;
  readonly cpuModel: string;
  readonly loadAverage: { readonly start: number; readonly end: number };
  /**
   * CPU seconds used during the run by processes that are not this benchmark, its children and
   * the registry (machine user+nice+system from /proc/stat minus this process and its reaped
   * children): other work competing for the same cores. Null when /proc cannot be read.
   */
  readonly otherCpuSeconds: number | null;
  readonly benchCpuSeconds: number | null;
  readonly tools: Omit<Tools, 'skopeo' | 'tar'> | null;
  readonly registry: string | null;
  readonly plan: Plan;
  readonly setup?: { readonly generateSeconds: number; readonly pushSeconds: number };
  readonly cold: readonly ColdRow[];
  readonly cached: readonly CachedRun[];
  readonly memory: readonly MemoryRow[];
  readonly modules?: ModulesPhase;
  readonly goals: readonly Goal[];
  readonly totalSeconds: number;
  readonly error?: string;
}

class Bench {
  readonly plan: Plan;
  readonly tmp: string;
  readonly tools: Tools;
  readonly host: string;
  readonly registryPid: number | undefined;
  readonly signal: AbortSignal;

  constructor(plan: Plan, tmp: string, tools: Tools, host: string, registryPid: number | undefined, signal: AbortSignal) {
    this.plan = plan;
    this.tmp = tmp;
    this.tools = tools;
    this.host = host;
    this.registryPid = registryPid;
    this.signal = signal;
  }

  registryCpu(): number | null {
    return this.registryPid === undefined ? null : procCpuSeconds(this.registryPid);
  }

  async kmm(img: PushedImage, runs: number, cache: ImageJob['cache']): Promise<{ r: ImageJobResult; processMs: number; registryCpuSeconds: number | null }> {
    const cpu0 = this.registryCpu();
    const { result, processMs } = await runWorker<ImageJobResult>(
      this.tmp,
      {
        kind: 'image',
        image: img.ref,
        moduleName: img.moduleName,
        layerDigests: img.layers.map((l) => l.digest),
        runs,
        cache,
        ...(this.plan.layerConcurrency ? { layerConcurrency: this.plan.layerConcurrency } : {}),
      },
      this.plan.stepTimeoutMs,
      this.signal,
    );
    const cpu1 = this.registryCpu();
    for (const [i, run] of result.runs.entries()) {
      if (run.status !== 'True') throw new Error(`kmm-preflight concluded ${run.status} (${run.code}) for ${img.ref} on run ${i + 1}, expected True: ${run.reason}`);
    }
    return { r: result, processMs, registryCpuSeconds: cpu0 === null || cpu1 === null ? null : round(cpu1 - cpu0) };
  }

  async naive(img: PushedImage): Promise<NaiveResult & { registryCpuSeconds: number | null }> {
    const cpu0 = this.registryCpu();
    const r = await naiveCheck(this.tools, this.tmp, img.ref, modulePath(img.moduleName), this.plan.stepTimeoutMs, this.signal);
    const cpu1 = this.registryCpu();
    if (!r.found) throw new Error(`the naive check did not find ${modulePath(img.moduleName)} in ${img.ref}`);
    return { ...r, registryCpuSeconds: cpu0 === null || cpu1 === null ? null : round(cpu1 - cpu0) };
  }

  /** Phase 1 and 2 (same process): cold and cached runs, alternating with the naive check. */
  async cold(images: readonly PushedImage[], withNaive: (img: PushedImage) => boolean, reps: number, cachedOut: CachedRun[], memoryOut: MemoryRow[]): Promise<ColdRow[]> {
    const rows: ColdRow[] = [];
    for (const img of images) {
      const kmmRuns: { r: ImageJobResult; processMs: number; registryCpuSeconds: number | null }[] = [];
      const naiveRuns: (NaiveResult & { registryCpuSeconds: number | null })[] = [];
      for (let rep = 0; rep < reps; rep++) {
        this.signal.throwIfAborted();
        // Alternate which goes first, so neither always finds the registry's files just read.
        const order = rep % 2 === 0 ? ['naive', 'kmm'] : ['kmm', 'naive'];
        for (const which of order) {
          if (which === 'naive' && withNaive(img)) {
            const n = await this.naive(img);
            naiveRuns.push(n);
            progress(`${img.name}: skopeo+tar ${n.ms.toFixed(0)} ms (copy ${n.copyMs.toFixed(0)} + tar ${n.searchMs.toFixed(0)}), ${mib(n.bytes).toFixed(1)} MiB`);
          } else if (which === 'kmm') {
            const k = await this.kmm(img, 2, { kind: 'memory' });
            kmmRuns.push(k);
            const [c, w] = k.r.runs;
            progress(`${img.name}: kmm-preflight ${c!.ms.toFixed(0)} ms, ${mib(c!.bytes).toFixed(1)} MiB; second run ${w!.ms.toFixed(1)} ms, ${w!.layerBlobBytes} layer bytes`);
          }
        }
      }
      const first = kmmRuns[0]!.r;
      const cold = kmmRuns.map((k) => k.r.runs[0]!);
      const warm = kmmRuns.map((k) => k.r.runs[1]!);
      const hwm = (xs: (number | null)[]) => (xs.some((x) => x === null) ? null : Math.max(...(xs as number[])));
      const highest = kmmRuns.reduce((a, k) => ((k.r.vmHwmEndKiB ?? 0) > (a.r.vmHwmEndKiB ?? 0) ? k : a));
      const kmm: KmmCold = {
        ms: round(median(cold.map((c) => c.ms))),
        allMs: cold.map((c) => c.ms),
        processMs: round(median(kmmRuns.map((k) => k.processMs))),
        bytes: cold[0]!.bytes,
        layerBlobsOpened: cold[0]!.layerBlobsOpened,
        layerBlobBytes: cold[0]!.layerBlobBytes,
        status: cold[0]!.status,
        code: cold[0]!.code,
        cpuSeconds: round(median(kmmRuns.map((k) => k.r.cpuSeconds))),
        registryCpuSeconds: kmmRuns.some((k) => k.registryCpuSeconds === null) ? null : round(median(kmmRuns.map((k) => k.registryCpuSeconds!))),
        vmHwmStartKiB: first.vmHwmStartKiB,
        vmHwmKiB: hwm(kmmRuns.map((k) => k.r.vmHwmEndKiB)),
        sampled: highest.r.sampled,
      };
      const naive: NaiveCold | undefined =
        naiveRuns.length === 0
          ? undefined
          : {
              ms: round(median(naiveRuns.map((n) => n.ms))),
              allMs: naiveRuns.map((n) => n.ms),
              copyMs: round(median(naiveRuns.map((n) => n.copyMs))),
              searchMs: round(median(naiveRuns.map((n) => n.searchMs))),
              bytes: naiveRuns[0]!.bytes,
              layersListed: naiveRuns[0]!.layersListed,
              registryCpuSeconds: naiveRuns.some((n) => n.registryCpuSeconds === null) ? null : round(median(naiveRuns.map((n) => n.registryCpuSeconds!))),
            };
      rows.push({
        image: img.name,
        layers: img.layers.length,
        imageBytes: img.totalLayerBytes,
        largestLayerBytes: Math.max(...img.layers.map((l) => l.size)),
        topLayerBytes: img.layers[img.layers.length - 1]!.size,
        moduleLayer: img.moduleLayer === img.layers.length - 1 ? `top (${img.moduleLayer + 1} of ${img.layers.length})` : img.moduleLayer === 0 ? `bottom (1 of ${img.layers.length})` : `${img.moduleLayer + 1} of ${img.layers.length}`,
        kmm,
        ...(naive ? { naive } : {}),
      });
      cachedOut.push({
        how: 'same process, memory cache',
        image: img.name,
        ms: round(median(warm.map((w) => w.ms)), 2),
        allMs: warm.map((w) => w.ms),
        bytes: Math.max(...warm.map((w) => w.bytes)),
        manifestBytes: Math.max(...warm.map((w) => w.manifestBytes)),
        layerBlobsOpened: Math.max(...warm.map((w) => w.layerBlobsOpened)),
        layerBytes: Math.max(...warm.map((w) => w.bytes - w.manifestBytes)),
        status: warm[0]!.status,
      });
      memoryOut.push({
        image: img.name,
        layers: img.layers.length,
        largestLayerBytes: Math.max(...img.layers.map((l) => l.size)),
        streamedBytes: cold[0]!.bytes,
        vmHwmStartKiB: kmm.vmHwmStartKiB,
        vmHwmKiB: kmm.vmHwmKiB,
        sampled: kmm.sampled,
      });
    }
    return rows;
  }

  /** Phase 2, across processes: a disk cache filled by one process, read by the next (`check --cache-dir`). */
  async diskCache(img: PushedImage, reps: number): Promise<CachedRun> {
    const dir = join(this.tmp, `layer-cache-${randomBytes(4).toString('hex')}`);
    try {
      await this.kmm(img, 1, { kind: 'disk', dir });
      const warm: RunFigures[] = [];
      for (let i = 0; i < reps; i++) warm.push((await this.kmm(img, 1, { kind: 'disk', dir })).r.runs[0]!);
      return {
        how: 'new process, disk cache',
        image: img.name,
        ms: round(median(warm.map((w) => w.ms))),
        allMs: warm.map((w) => w.ms),
        bytes: Math.max(...warm.map((w) => w.bytes)),
        manifestBytes: Math.max(...warm.map((w) => w.manifestBytes)),
        layerBlobsOpened: Math.max(...warm.map((w) => w.layerBlobsOpened)),
        layerBytes: Math.max(...warm.map((w) => w.bytes - w.manifestBytes)),
        status: warm[0]!.status,
      };
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  /** Phase 4: many Modules, each with its own small image. */
  async modules(registry: TestRegistryLike, ko: (name: string) => Promise<Buffer>, concurrency: number): Promise<ModulesPhase> {
    const { pushImage } = await import('../test/helpers/images.ts');
    const { createRegistryClient } = await import('../src/registry/client.ts');
    const client = createRegistryClient({ userAgent: 'kmm-preflight-bench-setup' });
    const n = this.plan.modules;
    const specs = Array.from({ length: n }, (_, i) => ({ name: `kmod_bench_${String(i).padStart(4, '0')}`, repo: `bench/small-${i}`, two: i % 2 === 1 }));
    let imageBytes = 0;
    const t0 = performance.now();
    try {
      await pool(specs, this.plan.pushConcurrency, async (s, i) => {
        this.signal.throwIfAborted();
        const moduleLayer = moduleEntries(s.name, await ko(s.name)).map((e) =>
          e.kind === 'dir' ? { path: e.name, type: 'directory' as const } : { path: e.name, content: e.kind === 'file' ? e.data : randomBytes(e.size) },
        );
        const base = [
          { path: 'etc/', type: 'directory' as const },
          { path: 'etc/os-release', content: `NAME="bench base ${i}"\nID=bench\n` },
          { path: 'usr/', type: 'directory' as const },
          { path: 'usr/lib/', type: 'directory' as const },
          { path: `usr/lib/bench-base-${i}.bin`, content: randomBytes(16 * 1024 + ((i * 7919) % (48 * 1024))) },
        ];
        const pushed = await pushImage(registry, `${s.repo}:${KERNEL}`, { layers: s.two ? [{ entries: base }, { entries: moduleLayer }] : [{ entries: moduleLayer }], client });
        imageBytes += pushed.layers.reduce((a, l) => a + l.size, 0) + pushed.config.size + pushed.manifest.length;
        if ((i + 1) % 100 === 0) progress(`pushed ${i + 1}/${n} small images`);
      });
    } finally {
      await client.close();
    }
    const setupSeconds = (performance.now() - t0) / 1000;
    progress(`pushed ${n} small images in ${setupSeconds.toFixed(1)} s; validating ${n} Modules at a concurrency of ${concurrency}`);
    const cpu0 = this.registryCpu();
    const { result, processMs } = await runWorker<ModulesJobResult>(
      this.tmp,
      {
        kind: 'modules',
        registryHost: this.host,
        concurrency,
        ...(this.plan.layerConcurrency ? { layerConcurrency: this.plan.layerConcurrency } : {}),
        modules: specs.map((s) => ({ name: s.name, repo: s.repo })),
      },
      this.plan.stepTimeoutMs,
      this.signal,
    );
    const cpu1 = this.registryCpu();
    if ((result.counts['True'] ?? 0) !== n) {
      throw new Error(`${n - (result.counts['True'] ?? 0)} of ${n} Modules were not verified: ${result.firstFailures.join(' | ')}`);
    }
    return {
      modules: n,
      concurrency,
      layers: { one: specs.filter((s) => !s.two).length, two: specs.filter((s) => s.two).length },
      imageBytes,
      setupSeconds: round(setupSeconds, 1),
      ms: result.ms,
      perSecond: round(n / (result.ms / 1000), 1),
      bytes: result.bytes,
      counts: result.counts,
      firstFailures: result.firstFailures,
      cpuSeconds: result.cpuSeconds,
      registryCpuSeconds: cpu0 === null || cpu1 === null ? null : round(cpu1 - cpu0),
      vmHwmKiB: result.vmHwmEndKiB,
      processMs: round(processMs),
    };
  }
}

type TestRegistryLike = import('../test/helpers/registry.ts').TestRegistry;

// ---- Report ---------------------------------------------------------------------------------

function goals(r: Omit<Report, 'goals'>): Goal[] {
  const out: Goal[] = [];
  const top = r.cold.find((c) => c.image === 'module on top');
  const bottom = r.cold.find((c) => c.image === 'module at the bottom');
  if (top?.naive) {
    const t = top.naive.ms / top.kmm.ms;
    const b = top.naive.bytes / top.kmm.bytes;
    out.push({
      goal: `module on top: at least ${GOAL_TOP_RATIO}x less time than skopeo+tar`,
      value: `${t.toFixed(2)}x (${fmtMs(top.kmm.ms)} vs ${fmtMs(top.naive.ms)}; ${(top.naive.ms / top.kmm.processMs).toFixed(2)}x counting the child's Node start-up, ${fmtMs(top.kmm.processMs)})`,
      met: t >= GOAL_TOP_RATIO,
    });
    out.push({
      goal: `module on top: at least ${GOAL_TOP_RATIO}x fewer bytes than skopeo+tar`,
      value: `${b.toFixed(5)}x (${top.kmm.bytes} vs ${top.naive.bytes} bytes; the top layer alone is ${top.topLayerBytes} bytes)`,
      met: b >= GOAL_TOP_RATIO,
    });
  }
  if (bottom?.naive) {
    const t = bottom.kmm.ms / bottom.naive.ms;
    out.push({ goal: `module at the bottom: at most ${GOAL_BOTTOM_RATIO}x the naive time`, value: `${t.toFixed(2)}x (${fmtMs(bottom.kmm.ms)} vs ${fmtMs(bottom.naive.ms)})`, met: t <= GOAL_BOTTOM_RATIO });
  }
  const same = r.cached.filter((c) => c.how.startsWith('same process'));
  if (same.length > 0) {
    const maxLayerBytes = Math.max(...same.map((c) => c.layerBytes));
    const maxBlobs = Math.max(...same.map((c) => c.layerBlobsOpened));
    const slowest = Math.max(...same.map((c) => c.ms));
    out.push({ goal: 'second validation (memory cache): 0 layer bytes read', value: `${maxLayerBytes} bytes, ${maxBlobs} layer blobs opened`, met: maxLayerBytes === 0 && maxBlobs === 0 });
    out.push({ goal: `second validation (memory cache): under ${GOAL_CACHED_MS} ms`, value: `${fmtMs(slowest)} (slowest image, median of runs)`, met: slowest < GOAL_CACHED_MS });
  }
  const peaks = [...r.memory.map((m) => m.vmHwmKiB), ...(r.modules ? [r.modules.vmHwmKiB] : [])];
  if (peaks.length > 0 && peaks.every((p) => p !== null)) {
    const peak = Math.max(...(peaks as number[])) / 1024;
    out.push({ goal: `peak memory (VmHWM) of the validating process under ${GOAL_PEAK_MIB} MiB`, value: `${peak.toFixed(0)} MiB (highest of ${peaks.length} processes)`, met: peak < GOAL_PEAK_MIB });
  }
  if (r.modules) {
    const s = r.modules.ms / 1000;
    out.push({ goal: `${r.modules.modules} Modules validated in under ${GOAL_MODULES_S} s`, value: `${s.toFixed(2)} s`, met: s < GOAL_MODULES_S });
  }
  return out;
}

function fmtRatio(x: number): string {
  return `${x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2)}x`;
}

function fmtMs(ms: number): string {
  return ms >= 10_000 ? `${(ms / 1000).toFixed(1)} s` : ms >= 100 ? `${ms.toFixed(0)} ms` : `${ms.toFixed(1)} ms`;
}

function fmtBytes(n: number): string {
  if (n >= MiB) return `${(n / MiB).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

function fmtKiB(k: number | null): string {
  return k === null ? 'n/a' : `${(k / 1024).toFixed(0)} MiB`;
}

const padEnd = (s: string | number, n: number) => String(s).padEnd(n);

function formatReport(r: Report): string {
  const out: string[] = [];
  out.push(`kmm-preflight Image stage benchmark (${r.mode}), started ${r.date}`);
  out.push(`node ${r.node}, ${r.cpus} CPUs (${r.cpuModel}); the registry, skopeo/tar and the validating process share them`);
  if (r.registry) out.push(`registry: ${r.registry}`);
  if (r.tools) out.push(`naive tools: ${r.tools.skopeoVersion}, ${r.tools.tarVersion}`);
  out.push(`1-minute load average: ${r.loadAverage.start.toFixed(2)} at the start, ${r.loadAverage.end.toFixed(2)} at the end`);
  out.push(`command: ${r.command}`);
  if (r.setup) out.push(`setup: random filler generated and gzipped to files in ${r.setup.generateSeconds.toFixed(1)} s, streamed to the registry in ${r.setup.pushSeconds.toFixed(1)} s`);

  if (r.cold.length > 0) {
    out.push('');
    out.push(
      `1. Cold validation (empty layer cache, new process): ${r.plan.layers} gzip layers of ${r.plan.layerMiB} MiB random filler each; median of ${r.plan.reps} run${r.plan.reps === 1 ? '' : 's'}`,
    );
    out.push(
      `   kmm-preflight: the Image stage's run() in a child process (Node start-up not included; "process" includes it); layerConcurrency ${r.plan.layerConcurrency ?? 'default'}`,
    );
    out.push(`   skopeo+tar: skopeo copy docker://… dir:…, then tar -tzf of each layer in manifest order (bottom first) until the module is listed`);
    out.push(`      ${padEnd('tool', 15)}${pad('wall', 9)}${pad('downloaded', 12)}${pad('layers', 8)}  detail`);
    for (const c of r.cold) {
      out.push(`   ${c.image}: ${c.layers} layers, ${fmtBytes(c.imageBytes)}, largest ${fmtBytes(c.largestLayerBytes)}; the module is in layer ${c.moduleLayer}`);
      out.push(
        `      ${padEnd('kmm-preflight', 15)}${pad(fmtMs(c.kmm.ms), 9)}${pad(fmtBytes(c.kmm.bytes), 12)}${pad(c.kmm.layerBlobsOpened, 8)}  ${c.kmm.status} ${c.kmm.code}; process ${fmtMs(c.kmm.processMs)}, CPU ${c.kmm.cpuSeconds.toFixed(2)} s, registry CPU ${c.kmm.registryCpuSeconds ?? 'n/a'} s; runs ${c.kmm.allMs.map((x) => x.toFixed(0)).join('/')} ms`,
      );
      if (c.naive) {
        out.push(
          `      ${padEnd('skopeo+tar', 15)}${pad(fmtMs(c.naive.ms), 9)}${pad(fmtBytes(c.naive.bytes), 12)}${pad(c.naive.layersListed, 8)}  copy ${fmtMs(c.naive.copyMs)} + tar ${fmtMs(c.naive.searchMs)}; registry CPU ${c.naive.registryCpuSeconds ?? 'n/a'} s; runs ${c.naive.allMs.map((x) => x.toFixed(0)).join('/')} ms`,
        );
        out.push(
          `      ${padEnd('ratio', 15)}${pad(fmtRatio(c.naive.ms / c.kmm.ms), 9)}${pad(fmtRatio(c.naive.bytes / c.kmm.bytes), 12)}          skopeo+tar / kmm-preflight (with the child's Node start-up: ${fmtRatio(c.naive.ms / c.kmm.processMs)} in time)`,
        );
      }
    }
    out.push(`   ("layers": layer blobs downloaded by kmm-preflight, layer tars listed by tar)`);
  }

  if (r.cached.length > 0) {
    out.push('');
    out.push('2. Second validation of the same image (layer scans cached)');
    out.push(`   ${padEnd('image', 36)}${padEnd('how', 30)}${pad('wall', 9)}${pad('layer bytes', 13)}${pad('blobs', 7)}${pad('manifest', 10)}`);
    for (const c of r.cached) {
      out.push(`   ${padEnd(c.image, 36)}${padEnd(c.how, 30)}${pad(fmtMs(c.ms), 9)}${pad(c.layerBytes, 13)}${pad(c.layerBlobsOpened, 7)}${pad(fmtBytes(c.manifestBytes), 10)}  runs ${c.allMs.map((x) => x.toFixed(1)).join('/')} ms`);
    }
    out.push(`   ("layer bytes": registry.bytesReceived during the run minus what resolveImage received; "manifest": the manifest, fetched again each time)`);
  }

  if (r.memory.length > 0 || r.modules) {
    out.push('');
    out.push('3. Peak memory of the validating process: VmHWM (the kernel\'s peak RSS) from /proc/self/status of the child, read after its imports and at its end;');
    out.push('   the highest of the repetitions. Also process.memoryUsage() sampled every 10 ms during the validations (peaks of each field)');
    out.push(`   ${padEnd('image', 36)}${pad('layers', 7)}${pad('largest layer', 15)}${pad('streamed', 11)}${pad('after imports', 15)}${pad('peak', 9)}   sampled peaks: heap used / heap total / external (of which ArrayBuffers)`);
    for (const m of r.memory) {
      const sp = m.sampled;
      out.push(
        `   ${padEnd(m.image, 36)}${pad(m.layers, 7)}${pad(fmtBytes(m.largestLayerBytes), 15)}${pad(fmtBytes(m.streamedBytes), 11)}${pad(fmtKiB(m.vmHwmStartKiB), 15)}${pad(fmtKiB(m.vmHwmKiB), 9)}   ${fmtBytes(sp.heapUsed)} / ${fmtBytes(sp.heapTotal)} / ${fmtBytes(sp.external)} (${fmtBytes(sp.arrayBuffers)})`,
      );
    }
    if (r.modules) out.push(`   ${padEnd(`${r.modules.modules} Modules (phase 4)`, 36)}${pad('1-2', 7)}${pad('', 15)}${pad(fmtBytes(r.modules.bytes), 11)}${pad('', 15)}${pad(fmtKiB(r.modules.vmHwmKiB), 9)}`);
  }

  if (r.modules) {
    const m = r.modules;
    out.push('');
    out.push(`4. ${m.modules} Modules, each with its own small image (${m.layers.one} with 1 layer, ${m.layers.two} with 2), validated with validateModuleForKernel at a concurrency of ${m.concurrency}`);
    out.push(`   ${pad('modules', 9)}${pad('wall', 10)}${pad('images/s', 10)}${pad('registry bytes', 16)}${pad('CPU', 8)}${pad('registry CPU', 14)}  verdicts`);
    out.push(
      `   ${pad(m.modules, 9)}${pad(`${(m.ms / 1000).toFixed(2)} s`, 10)}${pad(m.perSecond.toFixed(1), 10)}${pad(fmtBytes(m.bytes), 16)}${pad(`${m.cpuSeconds.toFixed(2)} s`, 8)}${pad(m.registryCpuSeconds === null ? 'n/a' : `${m.registryCpuSeconds.toFixed(2)} s`, 14)}  ${Object.entries(m.counts).map(([k, v]) => `${k} ${v}`).join(', ')}`,
    );
    out.push(`   (images pushed beforehand in ${m.setupSeconds.toFixed(1)} s, ${fmtBytes(m.imageBytes)} in all; the child process took ${fmtMs(m.processMs)} with start-up)`);
  }

  if (r.goals.length > 0) {
    out.push('');
    out.push('Goals');
    for (const g of r.goals) out.push(`  goal ${g.goal}: ${g.value} -> ${g.met ? 'goal met' : 'goal missed'}`);
  }
  if (r.mode === 'quick') out.push('  (quick run: the images are small, so ratios and times are indicative only; see the full run)');
  out.push('');
  if (r.error) out.push(`ERROR: ${r.error}`);
  out.push(
    `total ${r.totalSeconds.toFixed(1)} s; CPU: benchmark, its children and the registry ${r.benchCpuSeconds ?? 'n/a'} s, other processes ${r.otherCpuSeconds ?? 'n/a'} s (of ${(r.totalSeconds * r.cpus).toFixed(0)} CPU-seconds)`,
  );
  return `${out.join('\n')}\n`;
}

// ---- Main -----------------------------------------------------------------------------------

async function findTools(): Promise<Tools> {
  const { ensureDebianBinary } = await import('../test/helpers/debian.ts');
  const skopeo = await ensureDebianBinary('skopeo', 'skopeo');
  const tar = await ensureDebianBinary('tar', 'tar');
  const first = async (cmd: string, a: string[]) => {
    try {
      return (await execFileP(cmd, a, { timeout: 10_000 })).stdout.split('\n')[0]!.trim();
    } catch {
      return `${cmd} (version unknown)`;
    }
  };
  return {
    skopeo,
    tar,
    skopeoVersion: await first(skopeo, ['--version']),
    tarVersion: await first(tar, ['--version']),
    registryVersion: await first('docker-registry', ['--version']),
  };
}

async function main(plan: Plan, argv: { json: boolean }): Promise<number> {
  const t0 = Date.now();
  const startedAt = new Date(t0).toISOString();
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  const command = ['node', 'bench/image-stage.ts', ...process.argv.slice(2)].map(quote).join(' ');
  const loadStart = loadavg()[0] ?? 0;
  const machine0 = machineCpuSeconds();
  const self0 = selfAndChildrenCpuSeconds();
  const controller = new AbortController();
  const { signal } = controller;
  let registry: TestRegistryLike | undefined;
  let tmp: string | undefined;
  let tools: Tools | undefined;
  let setup: Report['setup'];
  const cold: ColdRow[] = [];
  const cached: CachedRun[] = [];
  const memory: MemoryRow[] = [];
  let modulesPhase: ModulesPhase | undefined;
  let error: string | undefined;
  let interrupted: NodeJS.Signals | undefined;

  const limit = setTimeout(() => controller.abort(new Error(`the run exceeded its ${plan.totalLimitMs / 1000} s limit`)), plan.totalLimitMs);
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted = sig;
    progress(`${sig}: stopping`);
    controller.abort(new Error(`interrupted by ${sig}`));
    setTimeout(() => process.exit(130), 15_000).unref();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    tools = await findTools();
    const { startRegistry } = await import('../test/helpers/registry.ts');
    const { buildModuleObject } = await import('../test/helpers/kmod-fixtures.ts');
    const { createRegistryClient } = await import('../src/registry/client.ts');
    const ko = async (name: string) => Buffer.from(await buildModuleObject({ name, vermagic: VERMAGIC }));
    tmp = await mkdtemp(join(tmpdir(), 'kmm-bench-image-stage-'));
    progress(`starting docker-registry (${plan.mode} run)`);
    registry = await startRegistry();
    const registryPid = findRegistryPid();
    const bench = new Bench(plan, tmp, tools, registry.host, registryPid, signal);

    const pusher = createRegistryClient({ userAgent: 'kmm-preflight-bench-setup' });
    let images: BigImages;
    try {
      images = await setupBigImages(plan, tmp, registry.host, pusher, ko, signal);
    } finally {
      await pusher.close();
    }
    setup = { generateSeconds: round(images.generateSeconds, 1), pushSeconds: round(images.pushSeconds, 1) };

    progress('phase 1/2: cold and cached validations');
    cold.push(...(await bench.cold([images.top, images.bottom], () => true, plan.reps, cached, memory)));
    cold.push(...(await bench.cold([images.smallTop], () => true, 1, cached, memory)));
    progress('phase 2: disk cache across processes');
    cached.push(await bench.diskCache(images.bottom, plan.reps));
    progress('phase 3: one large layer');
    await bench.cold([images.oneLayer], () => false, 1, [], memory);

    progress('phase 4: many Modules');
    modulesPhase = await bench.modules(registry, ko, plan.concurrency);
  } catch (err) {
    error = err instanceof Error ? err.message : String(err);
    if (interrupted && !error.startsWith('interrupted')) error = `interrupted by ${interrupted} (${error})`;
    progress(`error: ${error}`);
    if (registry && !interrupted) progress(`registry output (tail):\n${registry.output().slice(-2000)}`);
  } finally {
    clearTimeout(limit);
    for (const c of children) c.kill('SIGKILL');
    if (registry) await registry.stop().catch((e: unknown) => progress(`stopping the registry failed: ${String(e)}`));
    if (tmp) await rm(tmp, { recursive: true, force: true }).catch((e: unknown) => progress(`removing ${tmp} failed: ${String(e)}`));
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }

  // After registry.stop(): the registry is reaped, so its CPU is in this process's cstime/cutime.
  const machine1 = machineCpuSeconds();
  const self1 = selfAndChildrenCpuSeconds();
  const benchCpuSeconds = self0 === null || self1 === null ? null : round(self1 - self0, 1);
  const otherCpuSeconds = machine0 === null || machine1 === null || benchCpuSeconds === null ? null : round(Math.max(0, machine1 - machine0 - benchCpuSeconds), 1);
  const partial: Omit<Report, 'goals'> = {
    date: startedAt,
    command,
    mode: plan.mode,
    node: process.version,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    loadAverage: { start: round(loadStart), end: round(loadavg()[0] ?? 0) },
    otherCpuSeconds,
    benchCpuSeconds,
    tools: tools ? { skopeoVersion: tools.skopeoVersion, tarVersion: tools.tarVersion, registryVersion: tools.registryVersion } : null,
    registry: tools ? `Debian docker-registry (${tools.registryVersion}) on loopback, plain HTTP, filesystem storage under ${tmpdir()}` : null,
    plan,
    ...(setup ? { setup } : {}),
    cold,
    cached,
    memory,
    ...(modulesPhase ? { modules: modulesPhase } : {}),
    totalSeconds: round((Date.now() - t0) / 1000, 1),
    ...(error !== undefined ? { error } : {}),
  };
  const report: Report = { ...partial, goals: goals(partial) };
  process.stdout.write(argv.json ? `${JSON.stringify(report, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n` : formatReport(report));
  return interrupted ? 130 : error === undefined ? 0 : 1;
}

const args = parseCommandLine();
if (args.worker !== undefined) {
  try {
    await worker(args.worker);
  } catch (err) {
    process.stderr.write(`worker: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  }
} else {
  workerNodeOptions = args['worker-node-options'];
  const plan: Plan = args.quick
    ? {
        mode: 'quick',
        layers: 5,
        layerMiB: 8,
        fileMiB: 4,
        bigLayerMiB: 40,
        reps: 1,
        modules: 100,
        concurrency: args.concurrency,
        layerConcurrency: args.layerConcurrency,
        pushConcurrency: 8,
        stepTimeoutMs: 60_000,
        totalLimitMs: 3 * 60_000,
      }
    : {
        mode: 'full',
        layers: 5,
        layerMiB: 60,
        fileMiB: 12,
        bigLayerMiB: 300,
        reps: 3,
        modules: 500,
        concurrency: args.concurrency,
        layerConcurrency: args.layerConcurrency,
        pushConcurrency: 8,
        stepTimeoutMs: 300_000,
        totalLimitMs: 20 * 60_000,
      };
  process.exitCode = await main(plan, { json: args.json });
}
