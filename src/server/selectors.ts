/**
 * Label and field selectors with the syntax of k8s.io/apimachinery `labels.Parse` and
 * `fields.ParseSelector`. No maintained npm package parses them; the grammar is small.
 */
import { errors } from './errors.ts';

type Labels = Readonly<Record<string, string>>;

type Requirement =
  | { op: 'eq' | 'neq'; key: string; value: string }
  | { op: 'in' | 'notin'; key: string; values: readonly string[] }
  | { op: 'exists' | 'notexists'; key: string }
  | { op: 'gt' | 'lt'; key: string; value: number };

export interface LabelSelector {
  matches(labels: Labels | undefined): boolean;
  readonly empty: boolean;
}

const KEY_RE = /^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/)?([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$/;
const VALUE_RE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;

/** Splits on commas that are not inside parentheses. */
function splitTerms(text: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let cur = '';
  for (const ch of text) {
    if (ch === '(') depth++;
    if (ch === ')') depth--;
    if (ch === ',' && depth === 0) {
      out.push(cur);
      cur = '';
    } else cur += ch;
  }
  out.push(cur);
  return out.map((s) => s.trim()).filter((s) => s !== '');
}

function checkKey(key: string, selector: string): string {
  if (!KEY_RE.test(key) || key.length > 317) {
    throw errors.badRequest(`unable to parse requirement: invalid label key "${key}" in selector "${selector}"`);
  }
  return key;
}

function checkValue(value: string, selector: string): string {
  if (!VALUE_RE.test(value) || value.length > 63) {
    throw errors.badRequest(`unable to parse requirement: invalid label value "${value}" in selector "${selector}"`);
  }
  return value;
}

function parseRequirement(term: string, selector: string): Requirement {
  let m = /^(!)\s*(\S+)$/.exec(term);
  if (m) return { op: 'notexists', key: checkKey(m[2]!, selector) };
  m = /^(\S+?)\s+(in|notin)\s*\((.*)\)$/.exec(term);
  if (m) {
    const values = m[3]!.split(',').map((v) => checkValue(v.trim(), selector));
    return { op: m[2] as 'in' | 'notin', key: checkKey(m[1]!, selector), values };
  }
  m = /^([^=!<>\s]+)\s*(==|=|!=|<|>)\s*(\S*)$/.exec(term);
  if (m) {
    const key = checkKey(m[1]!, selector);
    const op = m[2]!;
    if (op === '<' || op === '>') {
      const n = Number(m[3]);
      if (!Number.isInteger(n)) {
        throw errors.badRequest(`unable to parse requirement: for 'gt', 'lt' operators, the value must be an integer in selector "${selector}"`);
      }
      return { op: op === '<' ? 'lt' : 'gt', key, value: n };
    }
    return { op: op === '!=' ? 'neq' : 'eq', key, value: checkValue(m[3]!, selector) };
  }
  m = /^(\S+)$/.exec(term);
  if (m) return { op: 'exists', key: checkKey(m[1]!, selector) };
  throw errors.badRequest(`unable to parse requirement: could not parse "${term}" in selector "${selector}"`);
}

function matchesRequirement(r: Requirement, labels: Labels): boolean {
  const has = Object.hasOwn(labels, r.key);
  const v = labels[r.key];
  switch (r.op) {
    case 'eq':
      return has && v === r.value;
    case 'neq':
      return !has || v !== r.value;
    case 'in':
      return has && r.values.includes(v!);
    case 'notin':
      return !has || !r.values.includes(v!);
    case 'exists':
      return has;
    case 'notexists':
      return !has;
    case 'gt':
    case 'lt': {
      if (!has) return false;
      const n = Number(v);
      if (!Number.isInteger(n)) return false;
      return r.op === 'gt' ? n > r.value : n < r.value;
    }
  }
}

/** Parses a label selector string; throws a 400 ApiError on bad syntax. */
export function parseLabelSelector(text: string | undefined): LabelSelector {
  const terms = text ? splitTerms(text) : [];
  const reqs = terms.map((t) => parseRequirement(t, text ?? ''));
  return {
    empty: reqs.length === 0,
    matches: (labels) => reqs.every((r) => matchesRequirement(r, labels ?? {})),
  };
}

export interface FieldSelector {
  /** True when the object with this name (cluster-scoped: namespace is always "") matches. */
  matches(fields: Readonly<Record<string, string>>): boolean;
  /** The exact `metadata.name` the selector requires, when it requires one (lets a list read one key). */
  readonly exactName?: string;
  readonly empty: boolean;
}

/**
 * Parses a field selector. Only fields the resource supports may be used (`metadata.name` and
 * `metadata.namespace` for these kinds), as kube-apiserver does: anything else is a 400.
 */
export function parseFieldSelector(text: string | undefined, supported: readonly string[]): FieldSelector {
  const terms = text ? splitTerms(text) : [];
  const reqs: { field: string; neq: boolean; value: string }[] = [];
  for (const term of terms) {
    const m = /^([^=!\s]+)\s*(==|=|!=)\s*(.*)$/.exec(term);
    if (!m) throw errors.badRequest(`invalid selector: '${text}'; can't understand '${term}'`);
    const field = m[1]!;
    if (!supported.includes(field)) {
      throw errors.badRequest(`field label not supported: ${field}`);
    }
    reqs.push({ field, neq: m[2] === '!=', value: m[3]!.trim() });
  }
  const exact = reqs.find((r) => r.field === 'metadata.name' && !r.neq)?.value;
  return {
    empty: reqs.length === 0,
    ...(exact !== undefined ? { exactName: exact } : {}),
    matches: (fields) => reqs.every((r) => ((fields[r.field] ?? '') === r.value) !== r.neq),
  };
}
