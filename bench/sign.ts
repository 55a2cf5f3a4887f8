/**
 * Benchmark of in-process module signing (`src/sign/module-signature.ts`) side by side with
 * Debian's `sign-file` (linux-kbuild-6.1), the tool KMM's signing Job runs once per module.
 *
 *   node bench/sign.ts             full run: 100 modules of 10 MiB, 3 rounds (about 30 s on 2 cores)
 *   node bench/sign.ts --quick     CI smoke run: 12 modules of 10 MiB, 1 round (a few seconds)
 *   node bench/sign.ts --json      one JSON object on stdout instead of the tables
 *   node bench/sign.ts --concurrency=4 --sign-file-parallel=2 --key-bits=4096 --hash=sha256
 *
 * Each round signs the same modules four ways: sign-file one process after the other; sign-file
 * in N parallel processes; kmm-preflight reading each module from its file, signing it and writing
 * the result (C at once, one process); kmm-preflight on modules already in memory. The key is an
 * RSA key and self-signed certificate made with `openssl req -x509 … -outform DER` as KMM's
 * documentation makes them. Before timing, one output of each tool is compared byte for byte.
 * During the kmm-preflight runs the event loop is watched with `monitorEventLoopDelay`
 * (resolution 1 ms) and a 1 ms `setInterval` drift probe.
 *
 * Exits 0 when every phase ran (a missed goal is reported, not failed), 1 on an error (a tool
 * failed, outputs differ, the time limit), 130 when interrupted. The temporary files are removed
 * however the run ends. See bench/README.md.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { promisify } from 'node:util';
import { benchCommandLine, clockTicks, pad, progress, round } from './lib.ts';
import { createModuleSigner, splitModuleSignature, type ModuleSigner, type SignHashAlgorithm } from '../src/sign/module-signature.ts';
import { buildModuleObject } from '../test/helpers/kmod-fixtures.ts';
import { ensureSignFile, makeSigningKey, signWithSignFile, type SigningKeyFiles } from '../test/helpers/sign-file.ts';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;
const GOAL_TIME_RATIO = 2; // kmm-preflight within 2x sign-file's serial time
const GOAL_BLOCK_MS = 50; // longest event-loop block while signing

const USAGE =
  'usage: node bench/sign.ts [--quick] [--json] [--modules=N] [--size-mib=N] [--rounds=N] [--concurrency=N] [--sign-file-parallel=N] [--key-bits=2048|3072|4096] [--hash=sha1|sha224|sha256|sha384|sha512]\n';

interface Plan {
  readonly mode: 'full' | 'quick';
  readonly modules: number;
  readonly sizeMiB: number;
  readonly rounds: number;
  readonly concurrency: number;
  readonly signFileParallel: number;
  readonly keyBits: 2048 | 3072 | 4096;
  readonly hash: SignHashAlgorithm;
  /** Distinct module files cycled through (all the same size). */
  readonly distinct: number;
  readonly totalLimitMs: number;
}

function parseCommandLine(): Plan & { json: boolean } {
  return benchCommandLine(
    'bench/sign.ts',
    USAGE,
    {
      modules: { type: 'string' },
      'size-mib': { type: 'string', default: '10' },
      rounds: { type: 'string' },
      concurrency: { type: 'string', default: '4' },
      'sign-file-parallel': { type: 'string', default: '2' },
      'key-bits': { type: 'string', default: '4096' },
      hash: { type: 'string', default: 'sha256' },
    },
    (values) => {
      const int = (name: string, v: string, min: number, max: number): number => {
        const n = Number(v);
        if (!Number.isInteger(n) || n < min || n > max) throw new Error(`--${name} must be a whole number from ${min} to ${max}`);
        return n;
      };
      const keyBits = int('key-bits', values['key-bits'], 2048, 4096);
      if (![2048, 3072, 4096].includes(keyBits)) throw new Error('--key-bits must be 2048, 3072 or 4096');
      if (!['sha1', 'sha224', 'sha256', 'sha384', 'sha512'].includes(values.hash)) throw new Error('--hash must be sha1, sha224, sha256, sha384 or sha512');
      const quick = values.quick;
      const modules = int('modules', values.modules ?? (quick ? '12' : '100'), 1, 10_000);
      return {
        json: values.json,
        mode: quick ? 'quick' : 'full',
        modules,
        sizeMiB: int('size-mib', values['size-mib'], 1, 512),
        rounds: int('rounds', values.rounds ?? (quick ? '1' : '3'), 1, 20),
        concurrency: int('concurrency', values.concurrency, 1, 64),
        signFileParallel: int('sign-file-parallel', values['sign-file-parallel'], 1, 64),
        keyBits: keyBits as Plan['keyBits'],
        hash: values.hash as SignHashAlgorithm,
        distinct: Math.min(modules, 8),
        totalLimitMs: quick ? 2 * 60_000 : 15 * 60_000,
      };
    },
  );
}

// ---- Measuring -------------------------------------------------------------------------------

/** CPU seconds of this process's reaped children (cutime + cstime), or null. */
function childrenCpuSeconds(): number | null {
  try {
    const stat = readFileSync('/proc/self/stat', 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[13]) + Number(f[14])) / clockTicks;
  } catch {
    return null;
  }
}

interface Run {
  readonly seconds: number;
  /** CPU seconds: this process (all its threads) for kmm-preflight, the sign-file children for sign-file. */
  readonly cpuSeconds: number | null;
  /** Longest event-loop delay (monitorEventLoopDelay max) and its p99, ms; kmm-preflight only. */
  readonly maxDelayMs?: number;
  readonly p99DelayMs?: number;
  /** Longest extra delay of a 1 ms setInterval, ms. */
  readonly maxDriftMs?: number;
}

/** Runs `fn(i)` for i in [0, n) with at most `limit` at once. */
async function pool(n: number, limit: number, signal: AbortSignal, fn: (i: number, slot: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, n) }, async (_, slot) => {
      for (;;) {
        signal.throwIfAborted();
        const i = next++;
        if (i >= n) return;
        await fn(i, slot);
      }
    }),
  );
}

async function timeSignFile(plan: Plan, inputs: readonly string[], tmp: string, keys: SigningKeyFiles, signFile: string, parallel: number, signal: AbortSignal): Promise<Run> {
  const cpu0 = childrenCpuSeconds();
  const t0 = performance.now();
  await pool(plan.modules, parallel, signal, async (i, slot) => {
    await execFileP(signFile, [plan.hash, keys.keyPath, keys.certDerPath, inputs[i % inputs.length]!, join(tmp, `sign-file-out-${slot}.ko`)], { signal, timeout: 60_000 });
  });
  const seconds = (performance.now() - t0) / 1000;
  const cpu1 = childrenCpuSeconds();
  return { seconds, cpuSeconds: cpu0 === null || cpu1 === null ? null : cpu1 - cpu0 };
}

async function timeProject(plan: Plan, signer: ModuleSigner, source: { files: readonly string[]; tmp: string } | { buffers: readonly Buffer[] }, signal: AbortSignal): Promise<Run> {
  const histogram = monitorEventLoopDelay({ resolution: 1 });
  let last = performance.now();
  let maxDrift = 0;
  const probe = setInterval(() => {
    const now = performance.now();
    maxDrift = Math.max(maxDrift, now - last - 1);
    last = now;
  }, 1);
  const cpu0 = process.cpuUsage();
  histogram.enable();
  const t0 = performance.now();
  try {
    await pool(plan.modules, plan.concurrency, signal, async (i, slot) => {
      if ('files' in source) {
        const data = await readFile(source.files[i % source.files.length]!, { signal });
        const signed = await signer.sign(data, signal);
        await writeFile(join(source.tmp, `kmm-out-${slot}.ko`), signed, { signal });
      } else {
        await signer.sign(source.buffers[i % source.buffers.length]!, signal);
      }
    });
  } finally {
    histogram.disable();
    clearInterval(probe);
  }
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  return {
    seconds,
    cpuSeconds: (cpu.user + cpu.system) / 1e6,
    maxDelayMs: histogram.max / 1e6,
    p99DelayMs: histogram.percentile(99) / 1e6,
    maxDriftMs: maxDrift,
  };
}

// ---- Report ----------------------------------------------------------------------------------

type Way = 'signFileSerial' | 'signFileParallel' | 'projectFiles' | 'projectMemory';
const WAYS: readonly Way[] = ['signFileSerial', 'signFileParallel', 'projectFiles', 'projectMemory'];

interface Report {
  readonly benchmark: 'sign';
  readonly mode: Plan['mode'];
  readonly date: string;
  readonly node: string;
  readonly cpus: string;
  readonly command: string;
  readonly loadAverage: { readonly start: number; readonly end: number };
  readonly plan: Omit<Plan, 'totalLimitMs'>;
  readonly identical: boolean;
  readonly rounds: readonly Readonly<Record<Way, Run>>[];
  readonly goals: readonly { readonly goal: string; readonly measured: string; readonly met: boolean }[];
  readonly error?: string;
}

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

function label(way: Way, plan: Plan): string {
  switch (way) {
    case 'signFileSerial':
      return 'sign-file, one process after another';
    case 'signFileParallel':
      return `sign-file, ${plan.signFileParallel} processes at once`;
    case 'projectFiles':
      return `kmm-preflight, file -> sign -> file, ${plan.concurrency} at once`;
    case 'projectMemory':
      return `kmm-preflight, in memory, ${plan.concurrency} at once`;
  }
}

function goals(rounds: readonly Record<Way, Run>[]): Report['goals'] {
  if (rounds.length === 0) return [];
  const serial = median(rounds.map((r) => r.signFileSerial.seconds));
  const ours = median(rounds.map((r) => r.projectFiles.seconds));
  const block = Math.max(...rounds.flatMap((r) => [r.projectFiles.maxDelayMs ?? 0, r.projectMemory.maxDelayMs ?? 0]));
  return [
    {
      goal: `kmm-preflight (file -> sign -> file) within ${GOAL_TIME_RATIO}x sign-file's serial time`,
      measured: `${round(ours, 2)} s vs ${round(serial, 2)} s (${round(ours / serial, 2)}x)`,
      met: ours <= GOAL_TIME_RATIO * serial,
    },
    {
      goal: `main thread never blocked ${GOAL_BLOCK_MS} ms or more while signing`,
      measured: `longest event-loop delay ${round(block, 1)} ms`,
      met: block < GOAL_BLOCK_MS,
    },
  ];
}

function formatReport(r: Report, plan: Plan): string {
  const mib = plan.modules * plan.sizeMiB;
  const lines = [
    `kmm-preflight module signing benchmark (${r.mode}), ${r.date}`,
    `node ${r.node}, ${r.cpus}; 1-minute load average ${r.loadAverage.start} at the start, ${r.loadAverage.end} at the end`,
    `command: ${r.command}`,
    `${plan.modules} modules of ${plan.sizeMiB} MiB (${mib} MiB; ${plan.distinct} distinct files cycled), RSA ${plan.keyBits}, ${plan.hash}, ${plan.rounds} round(s); median of the rounds [min-max]`,
    `outputs of kmm-preflight and sign-file byte-identical: ${r.identical ? 'yes' : 'NO'}`,
    '',
    `  ${'way'.padEnd(52)} ${pad('seconds', 16)} ${pad('MiB/s', 8)} ${pad('CPU s', 7)} ${pad('max loop delay', 15)} ${pad('p99', 6)} ${pad('drift', 6)}`,
  ];
  for (const way of WAYS) {
    const runs = r.rounds.map((x) => x[way]);
    if (runs.length === 0) continue;
    const secs = runs.map((x) => x.seconds);
    const s = median(secs);
    const cpu = runs.every((x) => x.cpuSeconds !== null) ? round(median(runs.map((x) => x.cpuSeconds!)), 2) : '-';
    const delay = runs[0]!.maxDelayMs === undefined ? '-' : `${round(Math.max(...runs.map((x) => x.maxDelayMs!)), 1)} ms`;
    const p99 = runs[0]!.p99DelayMs === undefined ? '-' : round(median(runs.map((x) => x.p99DelayMs!)), 1);
    const drift = runs[0]!.maxDriftMs === undefined ? '-' : round(Math.max(...runs.map((x) => x.maxDriftMs!)), 1);
    const range = `${round(s, 2)} [${round(Math.min(...secs), 2)}-${round(Math.max(...secs), 2)}]`;
    lines.push(`  ${label(way, plan).padEnd(52)} ${pad(range, 16)} ${pad(round(mib / s, 0), 8)} ${pad(cpu, 7)} ${pad(delay, 15)} ${pad(p99, 6)} ${pad(drift, 6)}`);
  }
  lines.push('', 'Goals');
  for (const g of r.goals) lines.push(`  goal ${g.goal}: ${g.measured} -> ${g.met ? 'goal met' : 'goal missed'}`);
  if (r.error) lines.push('', `ERROR: ${r.error}`);
  return `${lines.join('\n')}\n`;
}

// ---- Main ------------------------------------------------------------------------------------

async function main(plan: Plan, json: boolean): Promise<number> {
  const controller = new AbortController();
  const { signal } = controller;
  const limit = setTimeout(() => controller.abort(new Error(`the run exceeded its ${plan.totalLimitMs / 1000} s limit`)), plan.totalLimitMs);
  let interrupted = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    interrupted = true;
    progress(`${sig}: stopping`);
    controller.abort(new Error(`interrupted by ${sig}`));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const loadStart = round(loadavg()[0]!, 2);
  const rounds: Record<Way, Run>[] = [];
  let identical = false;
  let error: string | undefined;
  let tmp: string | undefined;
  let keys: SigningKeyFiles | undefined;
  try {
    const signFile = await ensureSignFile();
    tmp = await mkdtemp(join(tmpdir(), 'kmm-bench-sign-'));
    progress(`making an RSA ${plan.keyBits} key and certificate with openssl`);
    keys = await makeSigningKey({ type: 'rsa', bits: plan.keyBits }, 'kmm-preflight bench signing key');
    const signer = createModuleSigner(keys.key, keys.certDer, plan.hash);
    progress(`building a module with gcc and padding it to ${plan.sizeMiB} MiB (${plan.distinct} distinct files)`);
    const ko = await buildModuleObject({ name: 'kmm_bench_sign', vermagic: '6.1.0-18-amd64 SMP preempt mod_unload modversions ' });
    const filler = randomBytes(plan.sizeMiB * MiB - ko.length);
    const buffers: Buffer[] = [];
    const files: string[] = [];
    for (let i = 0; i < plan.distinct; i++) {
      const b = Buffer.concat([ko, filler]);
      b.writeUInt32LE(i, b.length - 4); // distinct content, same size
      buffers.push(b);
      const file = join(tmp, `in-${i}.ko`);
      await writeFile(file, b);
      files.push(file);
    }
    const ours = await signer.sign(buffers[0]!);
    const theirs = await signWithSignFile(buffers[0]!, { hash: plan.hash, keyPath: keys.keyPath, certPath: keys.certDerPath });
    identical = ours.equals(theirs);
    if (!identical) throw new Error('kmm-preflight and sign-file outputs differ');
    if (!splitModuleSignature(ours).content.equals(buffers[0]!)) throw new Error('the signed module does not start with the module');

    for (let round_ = 1; round_ <= plan.rounds; round_++) {
      progress(`round ${round_}/${plan.rounds}: sign-file serial`);
      const signFileSerial = await timeSignFile(plan, files, tmp, keys, signFile, 1, signal);
      progress(`round ${round_}/${plan.rounds}: sign-file x${plan.signFileParallel}`);
      const signFileParallel = await timeSignFile(plan, files, tmp, keys, signFile, plan.signFileParallel, signal);
      progress(`round ${round_}/${plan.rounds}: kmm-preflight from files`);
      const projectFiles = await timeProject(plan, signer, { files, tmp }, signal);
      progress(`round ${round_}/${plan.rounds}: kmm-preflight in memory`);
      const projectMemory = await timeProject(plan, signer, { buffers }, signal);
      rounds.push({ signFileSerial, signFileParallel, projectFiles, projectMemory });
    }
  } catch (err) {
    error = signal.aborted ? String((signal.reason as Error)?.message ?? signal.reason) : err instanceof Error ? err.message : String(err);
  } finally {
    clearTimeout(limit);
    await keys?.cleanup();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  }
  const cpu = cpus();
  const { totalLimitMs: _limit, ...planShown } = plan;
  const report: Report = {
    benchmark: 'sign',
    mode: plan.mode,
    date: new Date().toISOString(),
    node: process.version,
    cpus: `${cpu.length} CPUs (${cpu[0]?.model.trim() ?? 'unknown'})`,
    command: `node bench/sign.ts ${process.argv.slice(2).join(' ')}`.trim(),
    loadAverage: { start: loadStart, end: round(loadavg()[0]!, 2) },
    plan: planShown,
    identical,
    rounds,
    goals: goals(rounds),
    ...(error ? { error } : {}),
  };
  process.stdout.write(json ? `${JSON.stringify(report, null, 2)}\n` : formatReport(report, plan));
  return interrupted ? 130 : error === undefined ? 0 : 1;
}

const { json, ...plan } = parseCommandLine();
process.exitCode = await main(plan, json);
