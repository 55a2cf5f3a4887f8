/**
 * Field sets as structured-merge-diff (sigs.k8s.io/structured-merge-diff `fieldpath`) models them,
 * and their `FieldsV1` JSON form stored in `metadata.managedFields[].fieldsV1`.
 *
 * A set is a tree keyed by path elements, written exactly as in FieldsV1:
 *   - `f:<name>`  a field of a struct or a key of a map
 *   - `k:<json>`  an item of an associative list (`x-kubernetes-list-type: map`), by its key fields
 *                 sorted by name, e.g. `k:{"name":"a","namespace":"b"}`
 *   - `v:<json>`  an item of a set list (`x-kubernetes-list-type: set`), by its value
 *   - `i:<n>`     an item of a list by index (never produced here: CRD lists are atomic, map or set)
 * Each element of a node is a *member* (the path itself is in the set) and/or has *children*
 * (paths below it are in the set). In FieldsV1 a member with no children is `{}` and a member with
 * children carries `".": {}` next to them.
 *
 * Sets are persistent: operations never mutate their inputs and return an input unchanged (the same
 * instance) when the result equals it, so unchanged subtrees keep their identity. Serialisation
 * caches the JSON of each subtree, and sets decoded from stored FieldsV1 reuse the stored JSON,
 * which keeps work proportional to what changed rather than to the size of the object.
 */

export type JsonObject = { [k: string]: unknown };

export interface FieldNode {
  readonly member: boolean;
  /** Never empty when present. */
  readonly children: FieldSet | undefined;
}

export class FieldSetDecodeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FieldSetDecodeError';
  }
}

const hasOwn = Object.prototype.hasOwnProperty;

function isPlainObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isEmptyObject(o: JsonObject): boolean {
  for (const k in o) if (hasOwn.call(o, k)) return false;
  return true;
}

function hasKeyOtherThanDot(o: JsonObject): boolean {
  for (const k in o) if (k !== '.' && hasOwn.call(o, k)) return true;
  return false;
}

export class FieldSet {
  /**
   * Trusted FieldsV1 JSON this set starts from (keys already in order; its `.` belongs to the
   * parent). Entries are decoded on first access.
   */
  readonly #base: JsonObject | undefined;
  /** Entries on top of {@link #base} (`null`: removed), or all entries when there is no base. */
  readonly #over: ReadonlyMap<string, FieldNode | null>;
  #decoded: Map<string, FieldNode> | undefined;
  #baseKeys: string[] | undefined;
  #size: number | undefined;
  #jsonDot: JsonObject | undefined;
  #jsonNoDot: JsonObject | undefined;

  private constructor(base: JsonObject | undefined, over: ReadonlyMap<string, FieldNode | null>, size: number | undefined) {
    this.#base = base;
    this.#over = over;
    this.#size = size;
  }

  static readonly EMPTY: FieldSet = new FieldSet(undefined, new Map(), 0);

  /** @internal a set of the given entries (the map is given up). */
  static fromMap(map: Map<string, FieldNode>): FieldSet {
    return map.size === 0 ? FieldSet.EMPTY : new FieldSet(undefined, map, map.size);
  }

  /**
   * A set from FieldsV1 JSON written by this module (stored objects): decoded lazily, and its JSON
   * reused verbatim wherever the set is serialised unchanged.
   */
  static fromTrustedFieldsV1(json: JsonObject): FieldSet {
    if (!hasKeyOtherThanDot(json)) return FieldSet.EMPTY;
    const s = new FieldSet(json, new Map(), undefined);
    if (!hasOwn.call(json, '.')) s.#jsonNoDot = json;
    return s;
  }

  /**
   * A set from FieldsV1 JSON sent by a client: decoded eagerly, every path element validated and
   * put in canonical form. Throws {@link FieldSetDecodeError}.
   */
  static fromUntrustedFieldsV1(json: unknown): FieldSet {
    if (!isPlainObject(json)) throw new FieldSetDecodeError('fieldsV1 must be a JSON object');
    const map = new Map<string, FieldNode>();
    for (const key of Object.keys(json)) {
      if (key === '.') continue;
      const pe = canonicalPE(key);
      const value = json[key];
      if (!isPlainObject(value)) throw new FieldSetDecodeError(`fieldsV1 entry ${JSON.stringify(key)} must be a JSON object`);
      const member = isEmptyObject(value) || hasOwn.call(value, '.');
      const children = FieldSet.fromUntrustedFieldsV1(value);
      const prev = map.get(pe);
      const merged = prev?.children ? FieldSet.union(prev.children, children) : children;
      map.set(pe, { member: member || (prev?.member ?? false), children: merged.isEmpty() ? undefined : merged });
    }
    return FieldSet.fromMap(map);
  }

  /** Keys of the base, in their (sorted) order. */
  #keysOfBase(): string[] {
    if (this.#baseKeys === undefined) {
      const base = this.#base as JsonObject;
      const keys = Object.keys(base);
      const dot = keys.indexOf('.');
      if (dot >= 0) keys.splice(dot, 1);
      this.#baseKeys = keys;
    }
    return this.#baseKeys;
  }

  #decode(key: string): FieldNode | undefined {
    const base = this.#base;
    if (base === undefined || key === '.' || !hasOwn.call(base, key)) return undefined;
    let node = this.#decoded?.get(key);
    if (node) return node;
    const value = base[key];
    if (!isPlainObject(value)) throw new FieldSetDecodeError(`fieldsV1 entry ${JSON.stringify(key)} must be a JSON object`);
    if (key.length < 2 || key[1] !== ':') throw new FieldSetDecodeError(`invalid path element ${JSON.stringify(key)}`);
    const hasChildren = hasKeyOtherThanDot(value);
    let children: FieldSet | undefined;
    if (hasChildren) {
      children = new FieldSet(value, new Map(), undefined);
      if (hasOwn.call(value, '.')) children.#jsonDot = value;
      else children.#jsonNoDot = value;
    }
    node = { member: !hasChildren || hasOwn.call(value, '.'), children };
    (this.#decoded ??= new Map()).set(key, node);
    return node;
  }

  get(pe: string): FieldNode | undefined {
    const o = this.#over.get(pe);
    if (o !== undefined) return o ?? undefined;
    return this.#decode(pe);
  }

  /** The elements of this node (unordered). */
  *entries(): Generator<[string, FieldNode]> {
    const base = this.#base;
    const over = this.#over;
    if (base !== undefined) {
      for (const k of this.#keysOfBase()) {
        if (over.has(k)) continue;
        yield [k, this.#decode(k) as FieldNode];
      }
    }
    for (const [k, n] of over) if (n) yield [k, n];
  }

  get size(): number {
    if (this.#size === undefined) {
      let n = 0;
      if (this.#base !== undefined) {
        n = this.#keysOfBase().length;
        for (const [k, v] of this.#over) {
          const inBase = hasOwn.call(this.#base, k);
          if (inBase && v === null) n--;
          else if (!inBase && v !== null) n++;
        }
      } else n = this.#over.size;
      this.#size = n;
    }
    return this.#size;
  }

  isEmpty(): boolean {
    if (this.#size !== undefined) return this.#size === 0;
    if (this.#base !== undefined && this.#over.size === 0) return !hasKeyOtherThanDot(this.#base);
    return this.size === 0;
  }

  /**
   * A set equal to this one with `changes` applied (`null` removes an entry). Shares the base and
   * every untouched entry.
   */
  #derive(changes: Map<string, FieldNode | null>): FieldSet {
    if (changes.size === 0) return this;
    let size = this.#size;
    if (size !== undefined) {
      for (const [k, v] of changes) {
        const was = this.get(k) !== undefined;
        if (was && v === null) size--;
        else if (!was && v !== null) size++;
      }
    }
    if (this.#base === undefined) {
      const map = new Map(this.#over as Map<string, FieldNode>);
      for (const [k, v] of changes) {
        if (v === null) map.delete(k);
        else map.set(k, v);
      }
      return FieldSet.fromMap(map);
    }
    const over = new Map(this.#over);
    for (const [k, v] of changes) {
      if (v === null && !hasOwn.call(this.#base, k)) over.delete(k);
      else over.set(k, v);
    }
    const out = new FieldSet(this.#base, over, size);
    out.#decoded = this.#decoded;
    out.#baseKeys = this.#baseKeys;
    if (size === 0) return FieldSet.EMPTY;
    return out;
  }

  /** True when `path` (a list of path elements) is a member. */
  has(path: readonly string[]): boolean {
    let node: FieldSet | undefined = this;
    for (let i = 0; i < path.length; i++) {
      const e: FieldNode | undefined = node?.get(path[i] as string);
      if (e === undefined) return false;
      if (i === path.length - 1) return e.member;
      node = e.children;
    }
    return false;
  }

  /** Keys in structured-merge-diff's order (`PathElement.Compare`). */
  sortedKeys(): string[] {
    if (this.#base === undefined) return sortPathElements([...this.#over.keys()]);
    const baseKeys = this.#keysOfBase();
    if (this.#over.size === 0) return baseKeys;
    const added: string[] = [];
    for (const [k, v] of this.#over) if (v !== null && !hasOwn.call(this.#base, k)) added.push(k);
    const kept = baseKeys.filter((k) => this.#over.get(k) !== null);
    if (added.length === 0) return kept;
    if (added.length * 16 > kept.length) return sortPathElements([...kept, ...added]);
    // Few new keys: binary-insert them into the already ordered ones.
    const parsed = new Map<string, ParsedPE>();
    const pe = (k: string) => {
      let p = parsed.get(k);
      if (!p) parsed.set(k, (p = parsePE(k)));
      return p;
    };
    for (const k of sortPathElements(added)) {
      let lo = 0;
      let hi = kept.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (comparePathElements(pe(kept[mid] as string), pe(k)) < 0) lo = mid + 1;
        else hi = mid;
      }
      kept.splice(lo, 0, k);
    }
    return kept;
  }

  /** Paths in the order structured-merge-diff's `Set.Iterate` gives: members, then children, each sorted. */
  *paths(prefix: string[] = []): Generator<string[]> {
    const keys = this.sortedKeys();
    for (const k of keys) if ((this.get(k) as FieldNode).member) yield [...prefix, k];
    for (const k of keys) {
      const c = (this.get(k) as FieldNode).children;
      if (c) yield* c.paths([...prefix, k]);
    }
  }

  /** FieldsV1 JSON with keys in structured-merge-diff's order; `withDot` adds `".": {}`. */
  toFieldsV1(withDot = false): JsonObject {
    const cached = withDot ? this.#jsonDot : this.#jsonNoDot;
    if (cached !== undefined) return cached;
    const out: JsonObject = {};
    if (withDot && !this.isEmpty()) out['.'] = {};
    const base = this.#base;
    const over = this.#over;
    for (const k of this.sortedKeys()) {
      if (base !== undefined && !over.has(k)) {
        // Untouched entry of the base: its JSON as stored.
        out[k] = base[k];
        continue;
      }
      const node = this.get(k) as FieldNode;
      out[k] = node.children ? node.children.toFieldsV1(node.member) : {};
    }
    if (withDot) this.#jsonDot = out;
    else this.#jsonNoDot = out;
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // Set algebra (structured-merge-diff semantics; results share unchanged subtrees).

  static union(a: FieldSet, b: FieldSet): FieldSet {
    if (a === b || b.isEmpty()) return a;
    if (a.isEmpty()) return b;
    const changes = new Map<string, FieldNode | null>();
    for (const [pe, nb] of b.entries()) {
      const na = a.get(pe);
      if (na === undefined) {
        changes.set(pe, nb);
        continue;
      }
      const member = na.member || nb.member;
      const children = na.children && nb.children ? FieldSet.union(na.children, nb.children) : (na.children ?? nb.children);
      if (member !== na.member || children !== na.children) changes.set(pe, { member, children });
    }
    return a.#derive(changes);
  }

  /** Path-by-path difference: `a.b.c − a.b` keeps `a.b.c`. */
  static difference(a: FieldSet, b: FieldSet): FieldSet {
    if (a.isEmpty() || b.isEmpty()) return a;
    if (a === b) return FieldSet.EMPTY;
    const changes = new Map<string, FieldNode | null>();
    const visit = (pe: string, na: FieldNode, nb: FieldNode) => {
      const member = na.member && !nb.member;
      const children = na.children && nb.children ? FieldSet.difference(na.children, nb.children) : na.children;
      if (member === na.member && children === na.children) return;
      if (!member && (children === undefined || children.isEmpty())) changes.set(pe, null);
      else changes.set(pe, { member, children: children && !children.isEmpty() ? children : undefined });
    };
    if (b.size <= a.size) {
      for (const [pe, nb] of b.entries()) {
        const na = a.get(pe);
        if (na) visit(pe, na, nb);
      }
    } else {
      for (const [pe, na] of a.entries()) {
        const nb = b.get(pe);
        if (nb) visit(pe, na, nb);
      }
    }
    return a.#derive(changes);
  }

  /** Removes every path of `b` **and everything below it** from `a`. */
  static recursiveDifference(a: FieldSet, b: FieldSet): FieldSet {
    if (a.isEmpty() || b.isEmpty()) return a;
    const changes = new Map<string, FieldNode | null>();
    for (const [pe, nb] of b.entries()) {
      const na = a.get(pe);
      if (!na) continue;
      if (nb.member) {
        changes.set(pe, null);
        continue;
      }
      if (na.children && nb.children) {
        const children = FieldSet.recursiveDifference(na.children, nb.children);
        if (children === na.children) continue;
        if (!na.member && children.isEmpty()) changes.set(pe, null);
        else changes.set(pe, { member: na.member, children: children.isEmpty() ? undefined : children });
      }
    }
    return a.#derive(changes);
  }

  static intersection(a: FieldSet, b: FieldSet): FieldSet {
    if (a.isEmpty() || b.isEmpty()) return FieldSet.EMPTY;
    if (a === b) return a;
    const [small, large] = a.size <= b.size ? [a, b] : [b, a];
    const out = new Map<string, FieldNode>();
    for (const [pe, ns] of small.entries()) {
      const nl = large.get(pe);
      if (!nl) continue;
      const member = ns.member && nl.member;
      const children = ns.children && nl.children ? FieldSet.intersection(ns.children, nl.children) : undefined;
      if (member || (children && !children.isEmpty())) out.set(pe, { member, children: children && !children.isEmpty() ? children : undefined });
    }
    return FieldSet.fromMap(out);
  }

  equals(other: FieldSet): boolean {
    if (this === other) return true;
    if (this.size !== other.size) return false;
    for (const [pe, na] of this.entries()) {
      const nb = other.get(pe);
      if (!nb || nb.member !== na.member) return false;
      if (!na.children !== !nb.children) return false;
      if (na.children && nb.children && !na.children.equals(nb.children)) return false;
    }
    return true;
  }

  /** A set of the given paths (each a list of path elements). */
  static of(paths: Iterable<readonly string[]>): FieldSet {
    const b = new FieldSetBuilder();
    for (const p of paths) b.insert(p);
    return b.build();
  }
}

/** Builds a fresh set by inserting paths. */
export class FieldSetBuilder {
  readonly #root = new Map<string, BuilderNode>();

  insert(path: readonly string[]): void {
    if (path.length === 0) return;
    let map = this.#root;
    for (let i = 0; i < path.length; i++) {
      const pe = path[i] as string;
      let node = map.get(pe);
      if (node === undefined) {
        node = { member: false, children: undefined };
        map.set(pe, node);
      }
      if (i === path.length - 1) {
        node.member = true;
        return;
      }
      map = node.children ??= new Map();
    }
  }

  isEmpty(): boolean {
    return this.#root.size === 0;
  }

  build(): FieldSet {
    return buildSet(this.#root);
  }
}

interface BuilderNode {
  member: boolean;
  children: Map<string, BuilderNode> | undefined;
}

function buildSet(map: Map<string, BuilderNode>): FieldSet {
  const out = new Map<string, FieldNode>();
  for (const [pe, node] of map) {
    const children = node.children && node.children.size > 0 ? buildSet(node.children) : undefined;
    out.set(pe, { member: node.member, children });
  }
  return FieldSet.fromMap(out);
}

// -------------------------------------------------------------------------------------------------
// Path elements.

const GO_ESCAPES = /[<>&\u2028\u2029]/g;

/** JSON as Go's encoding/json writes it (HTML-safe escapes; object keys sorted). */
export function goJSON(value: unknown): string {
  const json = typeof value === 'object' && value !== null ? JSON.stringify(sortKeysDeep(value)) : JSON.stringify(value ?? null);
  GO_ESCAPES.lastIndex = 0;
  if (!GO_ESCAPES.test(json)) return json;
  return json.replace(GO_ESCAPES, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

function sortKeysDeep(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortKeysDeep);
  if (isPlainObject(value)) {
    const out: JsonObject = {};
    for (const k of Object.keys(value).sort(compareStrings)) out[k] = sortKeysDeep(value[k]);
    return out;
  }
  return value;
}

export function fieldPE(name: string): string {
  return 'f:' + name;
}

/** `k:{...}` for an associative list item, key fields sorted by name as structured-merge-diff does. */
export function keyPE(fields: ReadonlyArray<readonly [string, unknown]>): string {
  const sorted = [...fields].sort((x, y) => compareStrings(x[0], y[0]));
  return keyPESorted(
    sorted.map((f) => goJSON(f[0])),
    sorted.map((f) => f[1]),
  );
}

/** {@link keyPE} with the key names already sorted and JSON-encoded. */
export function keyPESorted(encodedNames: readonly string[], values: readonly unknown[]): string {
  let s = 'k:{';
  for (let i = 0; i < encodedNames.length; i++) {
    if (i > 0) s += ',';
    s += encodedNames[i] + ':' + goJSON(values[i]);
  }
  return s + '}';
}

export function valuePE(value: unknown): string {
  return 'v:' + goJSON(value);
}

export type ParsedPE =
  | { readonly type: 'f'; readonly name: string }
  | { readonly type: 'k'; readonly fields: ReadonlyArray<readonly [string, unknown]> }
  | { readonly type: 'v'; readonly value: unknown }
  | { readonly type: 'i'; readonly index: number };

export function parsePE(s: string): ParsedPE {
  if (s.length < 2 || s[1] !== ':') throw new FieldSetDecodeError(`missing colon: ${s}`);
  const body = s.slice(2);
  switch (s[0]) {
    case 'f':
      return { type: 'f', name: body };
    case 'v': {
      let value: unknown;
      try {
        value = JSON.parse(body);
      } catch {
        throw new FieldSetDecodeError(`invalid value in path element ${JSON.stringify(s)}`);
      }
      return { type: 'v', value };
    }
    case 'k': {
      let obj: unknown;
      try {
        obj = JSON.parse(body);
      } catch {
        throw new FieldSetDecodeError(`invalid key in path element ${JSON.stringify(s)}`);
      }
      if (!isPlainObject(obj)) throw new FieldSetDecodeError(`expected key value pairs in path element ${JSON.stringify(s)}`);
      const fields = Object.keys(obj)
        .sort(compareStrings)
        .map((k) => [k, obj[k]] as const);
      return { type: 'k', fields };
    }
    case 'i': {
      if (!/^-?\d+$/.test(body)) throw new FieldSetDecodeError(`invalid index in path element ${JSON.stringify(s)}`);
      return { type: 'i', index: Number(body) };
    }
    default:
      throw new FieldSetDecodeError(`unknown path element type: ${JSON.stringify(s)}`);
  }
}

/** The canonical spelling of a path element (sorted key fields, Go JSON). */
export function canonicalPE(s: string): string {
  const pe = parsePE(s);
  switch (pe.type) {
    case 'f':
      return s;
    case 'k':
      return keyPE(pe.fields);
    case 'v':
      return valuePE(pe.value);
    case 'i':
      return 'i:' + String(pe.index);
  }
}

/** Human form used in conflict messages (`fieldpath.PathElement.String()`). */
export function peToString(s: string): string {
  const pe = parsePE(s);
  switch (pe.type) {
    case 'f':
      return '.' + pe.name;
    case 'k':
      return '[' + pe.fields.map(([n, v]) => `${n}=${valueToString(v)}`).join(',') + ']';
    case 'v':
      return `[=${valueToString(pe.value)}]`;
    case 'i':
      return `[${pe.index}]`;
  }
}

export function pathToString(path: readonly string[]): string {
  return path.map(peToString).join('');
}

/** `value.ToString` of structured-merge-diff. */
function valueToString(v: unknown): string {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (Array.isArray(v)) return '[' + v.map(valueToString).join(',') + ']';
  if (isPlainObject(v)) return '{' + Object.keys(v).sort(compareStrings).map((k) => `${k}=${valueToString(v[k])}`).join(';') + '}';
  return String(v);
}

/** Byte-wise (UTF-8, i.e. code point) order, as Go's `strings.Compare`. */
export function compareStrings(a: string, b: string): number {
  if (a === b) return 0;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    // UTF-16 order differs from code point order only between surrogates and U+E000..U+FFFF.
    if (x >= 0xd800) x = x >= 0xe000 ? x - 0x800 : x + 0x2000;
    if (y >= 0xd800) y = y >= 0xe000 ? y - 0x800 : y + 0x2000;
    return x < y ? -1 : 1;
  }
  return a.length < b.length ? -1 : a.length > b.length ? 1 : 0;
}

const TYPE_ORDER: Record<string, number> = { f: 0, k: 1, v: 2, i: 3 };

/** `value.Compare` of structured-merge-diff: numbers, strings, booleans, lists, maps, null. */
export function compareValues(a: unknown, b: unknown): number {
  const rank = (v: unknown) =>
    typeof v === 'number' ? 0 : typeof v === 'string' ? 1 : typeof v === 'boolean' ? 2 : Array.isArray(v) ? 3 : isPlainObject(v) ? 4 : 5;
  const ra = rank(a);
  const rb = rank(b);
  if (ra !== rb) return ra < rb ? -1 : 1;
  switch (ra) {
    case 0:
      return (a as number) < (b as number) ? -1 : (a as number) > (b as number) ? 1 : 0;
    case 1:
      return compareStrings(a as string, b as string);
    case 2:
      return a === b ? 0 : a === false ? -1 : 1;
    case 3: {
      const la = a as unknown[];
      const lb = b as unknown[];
      for (let i = 0; i < Math.min(la.length, lb.length); i++) {
        const c = compareValues(la[i], lb[i]);
        if (c !== 0) return c;
      }
      return la.length - lb.length < 0 ? -1 : la.length > lb.length ? 1 : 0;
    }
    case 4: {
      const fa = Object.keys(a as JsonObject).sort(compareStrings).map((k) => [k, (a as JsonObject)[k]] as const);
      const fb = Object.keys(b as JsonObject).sort(compareStrings).map((k) => [k, (b as JsonObject)[k]] as const);
      return compareFieldLists(fa, fb);
    }
    default:
      return 0;
  }
}

function compareFieldLists(a: ReadonlyArray<readonly [string, unknown]>, b: ReadonlyArray<readonly [string, unknown]>): number {
  for (let i = 0; ; i++) {
    if (i >= a.length && i >= b.length) return 0;
    if (i >= a.length) return -1;
    if (i >= b.length) return 1;
    const [na, va] = a[i] as readonly [string, unknown];
    const [nb, vb] = b[i] as readonly [string, unknown];
    const c = compareStrings(na, nb);
    if (c !== 0) return c;
    const d = compareValues(va, vb);
    if (d !== 0) return d;
  }
}

export function comparePathElements(a: ParsedPE, b: ParsedPE): number {
  if (a.type !== b.type) return (TYPE_ORDER[a.type] as number) - (TYPE_ORDER[b.type] as number) < 0 ? -1 : 1;
  switch (a.type) {
    case 'f':
      return compareStrings(a.name, (b as { name: string }).name);
    case 'k':
      return compareFieldLists(a.fields, (b as { fields: ReadonlyArray<readonly [string, unknown]> }).fields);
    case 'v':
      return compareValues(a.value, (b as { value: unknown }).value);
    case 'i': {
      const y = (b as { index: number }).index;
      return a.index < y ? -1 : a.index > y ? 1 : 0;
    }
  }
}

/** Sorts path element strings in structured-merge-diff's `PathElement.Compare` order. */
export function sortPathElements(keys: string[]): string[] {
  if (keys.length < 2) return keys;
  let allFields = true;
  for (const k of keys) {
    if (k.charCodeAt(0) !== 0x66 /* f */) {
      allFields = false;
      break;
    }
  }
  if (allFields) return keys.sort(compareStrings);
  const parsed = keys.map((k) => ({ k, pe: parsePE(k) }));
  parsed.sort((x, y) => comparePathElements(x.pe, y.pe));
  return parsed.map((x) => x.k);
}
