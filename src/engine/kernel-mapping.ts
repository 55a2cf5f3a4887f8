/**
 * Kernel strings and kernel-mapping regular expressions, as KMM treats them.
 *
 * KMM (internal/module/kernelmapper.go `findKernelMapping`) walks the mappings in order and takes
 * the first whose `literal` equals the kernel or whose `regexp` matches it with Go's
 * `regexp.MatchString`, an unanchored search with Go's RE2 syntax. Regexps are compiled here with
 * re2js, a port of Go's regexp package (through RE2J) that accepts and rejects the same syntax and
 * reports Go's own error strings; see docs/adr/0007-kernel-mapping-regexps.md.
 */
import { RE2JS } from 're2js';

/**
 * KMM's `kernel.NormalizeVersion` (internal/kernel/kernel.go): every character other than ASCII
 * letters, digits, `-`, `.` and `_` becomes `_`. Templates see the normalised kernel; matching
 * uses the kernel as the node reports it.
 */
export function normalizeKernelVersion(kernel: string): string {
  return kernel.replace(/[^A-Za-z0-9._-]/gu, '_');
}

export interface KernelVersionParts {
  /** `KERNEL_FULL_VERSION` and `KERNEL_VERSION`: both are the whole kernel string in KMM. */
  readonly full: string;
  /** `KERNEL_XYZ`: the first three components joined with `.`, e.g. `6.1.0`. */
  readonly xyz: string;
  readonly x: string;
  readonly y: string;
  readonly z: string;
}

/**
 * KMM's `utils.KernelComponentsAsEnvVars` (internal/utils/replaceStrings.go): the kernel split on
 * `[.,-]`. `6.1.0-13-amd64` gives x `6`, y `1`, z `0`, xyz `6.1.0`; `6.8-rc1` gives z `rc1`.
 * Returns undefined when there are fewer than three components: KMM slices `[:3]` and panics.
 * The caller passes the kernel already normalised when it reproduces KMM's templates.
 */
export function kernelVersionParts(kernel: string): KernelVersionParts | undefined {
  const fields = kernel.split(/[.,-]/u);
  const [x, y, z] = fields;
  if (x === undefined || y === undefined || z === undefined) return undefined;
  return { full: kernel, xyz: `${x}.${y}.${z}`, x, y, z };
}

/** The kernel variables of KMM's templates, in KMM's order. */
export function kernelTemplateVars(parts: KernelVersionParts): Map<string, string> {
  return new Map([
    ['KERNEL_FULL_VERSION', parts.full],
    ['KERNEL_VERSION', parts.full],
    ['KERNEL_XYZ', parts.xyz],
    ['KERNEL_X', parts.x],
    ['KERNEL_Y', parts.y],
    ['KERNEL_Z', parts.z],
  ]);
}

/** A kernel-mapping regexp compiled once, or Go's reason for rejecting it. */
export type CompiledRegexp =
  | { readonly ok: true; readonly source: string; test(kernel: string): boolean }
  | { readonly ok: false; readonly source: string; readonly error: string };

/**
 * Compiles `pattern` with Go's syntax (Perl flags: `(?i)`, `(?P<name>…)`, `\d`, `\pL`, `\Q…\E`…).
 * Lookarounds, backreferences, atomic groups, possessive quantifiers, `\Z` and `\C` are refused, as
 * Go refuses them, with Go's message (`error parsing regexp: invalid escape sequence: \`\Z\``).
 */
export function compileKernelRegexp(pattern: string): CompiledRegexp {
  let re: RE2JS;
  try {
    re = RE2JS.compile(pattern);
  } catch (err) {
    return { ok: false, source: pattern, error: err instanceof Error ? err.message : String(err) };
  }
  // RE2JS#test is an unanchored search, like Go's MatchString.
  return { ok: true, source: pattern, test: (kernel: string) => re.test(kernel) };
}
