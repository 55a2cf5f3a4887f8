/**
 * Helpers shared by the benchmarks: progress lines, rounding, and /proc readings of the
 * processes a benchmark starts (the server, the registry) and of the whole machine.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs, type ParseArgsOptionsConfig } from 'node:util';
import type { TestServer } from '../test/helpers/server.ts';

export const progress = (msg: string) => process.stderr.write(`[bench] ${msg}\n`);
export const round = (x: number, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits;
export const pad = (s: string | number, n: number) => String(s).padStart(n);

const COMMON_OPTIONS = {
  quick: { type: 'boolean', default: false },
  json: { type: 'boolean', default: false },
  help: { type: 'boolean', short: 'h', default: false },
} as const;

type Parsed<O extends ParseArgsOptionsConfig> = ReturnType<typeof parseArgs<{ options: typeof COMMON_OPTIONS & O; strict: true; allowPositionals: false }>>['values'];

/**
 * A benchmark's command line: `--quick`, `--json`, `--help` and its own `options`; `refine` checks
 * and converts the values (throw for a usage error). `--help` prints `usage` and exits 0; a usage
 * error prints the reason and `usage` to stderr and exits 2.
 */
export function benchCommandLine<O extends ParseArgsOptionsConfig, R = Parsed<O>>(
  script: string,
  usage: string,
  options: O,
  refine: (values: Parsed<O>) => R = (v) => v as unknown as R,
): R {
  try {
    const values = parseArgs({ options: { ...COMMON_OPTIONS, ...options }, strict: true, allowPositionals: false }).values as Parsed<O>;
    if ((values as Record<string, unknown>)['help'] === true) {
      process.stdout.write(usage);
      process.exit(0);
    }
    return refine(values);
  } catch (err) {
    process.stderr.write(`${script}: ${(err as Error).message}\n${usage}`);
    process.exit(2);
  }
}

/** Clock ticks per second of /proc CPU times. */
export const clockTicks = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100; // the usual 100 Hz
  }
})();

/** A field of /proc/<pid>/status in KiB (VmHWM, VmRSS), or null (no such process or field). */
export function procStatusKiB(pid: number | 'self' | undefined, field: string): number | null {
  if (pid === undefined) return null;
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** CPU seconds (user + system) of a process from /proc/<pid>/stat, or null. */
export function procCpuSeconds(pid: number | undefined): number | null {
  if (pid === undefined) return null;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / clockTicks;
  } catch {
    return null;
  }
}

/** The pid of the server child, found by its data directory on the command line. */
export function findServerPid(server: TestServer): number | undefined {
  const dataDir = join(server.dir, 'data');
  try {
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        const argv = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
        const i = argv.indexOf('--data-dir');
        if (i >= 0 && argv[i + 1] === dataDir) return Number(entry);
      } catch {
        continue; // gone, or not ours
      }
    }
  } catch {
    // no /proc
  }
  return undefined;
}

/** The docker-registry child of this process. */
export function findRegistryPid(): number | undefined {
  try {
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
        const after = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        if (Number(after[1]) !== process.pid) continue;
        if (readFileSync(`/proc/${entry}/comm`, 'utf8').trim().startsWith('docker-registry')) return Number(entry);
      } catch {
        continue;
      }
    }
  } catch {
    // no /proc
  }
  return undefined;
}

/** CPU seconds (user + nice + system) of the whole machine from /proc/stat, or null. */
export function machineCpuSeconds(): number | null {
  try {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    return ((f[0] ?? 0) + (f[1] ?? 0) + (f[2] ?? 0)) / clockTicks;
  } catch {
    return null;
  }
}
