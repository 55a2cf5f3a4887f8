/**
 * Validation of request objects against the API schemas: ajv for the schema, plus the ObjectMeta
 * rules kube-apiserver applies to every object (names, labels, annotations, finalizers), and the
 * unknown-field walk behind `fieldValidation=Strict|Warn|Ignore`.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import ajvErrorsModule from 'ajv-errors';
import ajvFormatsModule from 'ajv-formats';
import { isImageReference } from '../image/reference.ts';
import { fieldError, type FieldError } from './field-errors.ts';

// Both packages are CommonJS with `exports.default`; under Node's ESM loader the default import is
// the module object.
type Plugin = (ajv: Ajv, options?: unknown) => Ajv;
const pluginOf = (m: unknown): Plugin => ((m as { default?: Plugin }).default ?? (m as Plugin));
const ajvErrors = pluginOf(ajvErrorsModule);
const ajvFormats = pluginOf(ajvFormatsModule);

type Json = unknown;
type JsonSchema = Record<string, unknown>;

const KUBERNETES_KEYWORDS = [
  'x-kubernetes-list-type',
  'x-kubernetes-list-map-keys',
  'x-kubernetes-map-type',
  'x-kubernetes-group-version-kind',
  'x-kubernetes-preserve-unknown-fields',
];

export function createAjv(): Ajv {
  const ajv = new Ajv({ allErrors: true, strict: true, strictTypes: false, useDefaults: false });
  ajvFormats(ajv, { formats: ['date-time'] } as unknown);
  ajvErrors(ajv);
  ajv.addVocabulary(KUBERNETES_KEYWORDS);
  ajv.addFormat('image-reference', { type: 'string', validate: isImageReference });
  return ajv;
}

/** `/spec/modules/3/name` → `spec.modules[3].name`, as field paths read in kube errors. */
export function pointerToFieldPath(pointer: string): string {
  if (pointer === '') return '';
  let out = '';
  for (const raw of pointer.slice(1).split('/')) {
    const part = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (/^\d+$/.test(part)) out += `[${part}]`;
    else if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(part)) out += `[${part}]`;
    else out += out === '' ? part : `.${part}`;
  }
  return out;
}

function valueAt(root: Json, pointer: string): Json {
  let cur: Json = root;
  if (pointer === '') return cur;
  for (const raw of pointer.slice(1).split('/')) {
    const part = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (cur === null || typeof cur !== 'object') return undefined;
    cur = (cur as Record<string, Json>)[part];
  }
  return cur;
}

const join = (base: string, prop: string) => (base === '' ? prop : `${base}.${prop}`);

function ajvToFieldErrors(errs: readonly ErrorObject[], data: Json): FieldError[] {
  const out: FieldError[] = [];
  const seen = new Set<string>();
  for (const e of errs) {
    const path = pointerToFieldPath(e.instancePath);
    const value = valueAt(data, e.instancePath);
    let fe: FieldError;
    switch (e.keyword) {
      case 'required':
        fe = fieldError.required(join(path, String((e.params as { missingProperty: string }).missingProperty)));
        break;
      case 'type':
        fe = fieldError.typeInvalid(path, value, `must be of type ${(e.params as { type: string }).type}`);
        break;
      case 'enum':
        fe = fieldError.notSupported(path, value, (e.params as { allowedValues: string[] }).allowedValues);
        break;
      case 'errorMessage':
        fe = fieldError.invalid(path, value, e.message ?? 'is invalid');
        break;
      case 'maxLength':
        fe = fieldError.tooLong(path, (e.params as { limit: number }).limit);
        break;
      default:
        fe = fieldError.invalid(path, value, e.message ?? 'is invalid');
    }
    const key = `${fe.type}|${fe.field}`;
    if (!seen.has(key)) {
      seen.add(key);
      out.push(fe);
    }
  }
  return out;
}

/** A compiled validator for one kind: returns field errors (empty when valid). */
export function compileObjectValidator(ajv: Ajv, schema: JsonSchema): (obj: Json) => FieldError[] {
  const validate: ValidateFunction = ajv.compile(schema);
  return (obj) => {
    if (!validate(obj)) return ajvToFieldErrors(validate.errors ?? [], obj);
    const dups: FieldError[] = [];
    checkListTypes(schema, obj, '', dups);
    return dups;
  };
}

/**
 * `x-kubernetes-list-type` map and set lists must not repeat a key (a Module listed twice in
 * status.modules would make its verdict ambiguous), as kube-apiserver enforces for CRDs.
 */
function checkListTypes(schema: JsonSchema, value: Json, path: string, out: FieldError[]): void {
  if (value === null || typeof value !== 'object') return;
  if (Array.isArray(value)) {
    const listType = schema['x-kubernetes-list-type'];
    const items = schema['items'] as JsonSchema | undefined;
    if (listType === 'map' || listType === 'set') {
      const keys = (schema['x-kubernetes-list-map-keys'] as string[] | undefined) ?? [];
      const seen = new Set<string>();
      value.forEach((item, i) => {
        const key =
          listType === 'set'
            ? JSON.stringify(item)
            : JSON.stringify(keys.map((k) => (item as Record<string, Json> | null)?.[k] ?? null));
        if (seen.has(key)) {
          const badValue = listType === 'set' ? item : Object.fromEntries(keys.map((k) => [k, (item as Record<string, Json>)[k]]));
          out.push({ type: 'FieldValueDuplicate', field: `${path}[${i}]`, badValue, detail: '' });
        }
        seen.add(key);
      });
    }
    if (items) value.forEach((v, i) => checkListTypes(items, v, `${path}[${i}]`, out));
    return;
  }
  const props = schema['properties'] as Record<string, JsonSchema> | undefined;
  if (!props) return;
  for (const [k, sub] of Object.entries(props)) {
    const v = (value as Record<string, Json>)[k];
    if (v !== undefined) checkListTypes(sub, v, path === '' ? k : `${path}.${k}`, out);
  }
}

const DNS1123_LABEL = '[a-z0-9]([-a-z0-9]*[a-z0-9])?';
const DNS1123_SUBDOMAIN_RE = new RegExp(`^${DNS1123_LABEL}(\\.${DNS1123_LABEL})*$`);
const QUALIFIED_NAME_RE = /^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$/;
const LABEL_VALUE_RE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;
const TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024;

const SUBDOMAIN_HELP =
  "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

export function validateDnsSubdomain(field: string, value: string): FieldError[] {
  const errs: FieldError[] = [];
  if (value.length > 253) errs.push(fieldError.invalid(field, value, 'must be no more than 253 characters'));
  if (!DNS1123_SUBDOMAIN_RE.test(value)) errs.push(fieldError.invalid(field, value, SUBDOMAIN_HELP));
  return errs;
}

function validateQualifiedName(field: string, key: string): FieldError[] {
  const parts = key.split('/');
  const help =
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
  if (parts.length > 2) {
    return [
      fieldError.invalid(
        field,
        key,
        "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
      ),
    ];
  }
  const errs: FieldError[] = [];
  const name = parts.length === 2 ? parts[1]! : parts[0]!;
  if (parts.length === 2) {
    const prefix = parts[0]!;
    if (prefix.length === 0) errs.push(fieldError.invalid(field, key, 'prefix part must be non-empty'));
    else if (prefix.length > 253 || !DNS1123_SUBDOMAIN_RE.test(prefix)) {
      errs.push(fieldError.invalid(field, key, `prefix part ${SUBDOMAIN_HELP}`));
    }
  }
  if (name.length === 0) errs.push(fieldError.invalid(field, key, 'name part must be non-empty'));
  else if (name.length > 63) errs.push(fieldError.invalid(field, key, 'name part must be no more than 63 characters'));
  else if (!QUALIFIED_NAME_RE.test(name)) errs.push(fieldError.invalid(field, key, help));
  return errs;
}

/** ObjectMeta rules for cluster-scoped objects, as apimachinery's ValidateObjectMeta. */
export function validateObjectMeta(meta: Record<string, unknown> | undefined, requireName: boolean): FieldError[] {
  const errs: FieldError[] = [];
  if (!meta) return requireName ? [fieldError.required('metadata.name', 'name or generateName is required')] : [];
  const name = meta['name'];
  if (typeof name === 'string' && name !== '') errs.push(...validateDnsSubdomain('metadata.name', name));
  else if (requireName) errs.push(fieldError.required('metadata.name', 'name or generateName is required'));
  const labels = meta['labels'];
  if (labels && typeof labels === 'object') {
    for (const [k, v] of Object.entries(labels as Record<string, unknown>)) {
      errs.push(...validateQualifiedName(`metadata.labels`, k));
      if (typeof v === 'string') {
        if (v.length > 63) errs.push(fieldError.invalid(`metadata.labels`, v, 'must be no more than 63 characters'));
        else if (!LABEL_VALUE_RE.test(v)) {
          errs.push(
            fieldError.invalid(
              `metadata.labels`,
              v,
              "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
            ),
          );
        }
      }
    }
  }
  const annotations = meta['annotations'];
  if (annotations && typeof annotations === 'object') {
    let size = 0;
    for (const [k, v] of Object.entries(annotations as Record<string, unknown>)) {
      errs.push(...validateQualifiedName('metadata.annotations', k.toLowerCase()));
      size += k.length + (typeof v === 'string' ? v.length : 0);
    }
    if (size > TOTAL_ANNOTATION_SIZE_LIMIT) errs.push(fieldError.tooLong('metadata.annotations', TOTAL_ANNOTATION_SIZE_LIMIT));
  }
  const finalizers = meta['finalizers'];
  if (Array.isArray(finalizers)) {
    const seen = new Set<string>();
    finalizers.forEach((f, i) => {
      if (typeof f !== 'string') return;
      errs.push(...validateQualifiedName(`metadata.finalizers[${i}]`, f));
      if (seen.has(f)) errs.push({ type: 'FieldValueDuplicate', field: `metadata.finalizers[${i}]`, badValue: f, detail: '' });
      seen.add(f);
    });
  }
  return errs;
}

function isObjectSchema(s: JsonSchema): boolean {
  return s['type'] === 'object' || 'properties' in s || 'patternProperties' in s || 'additionalProperties' in s;
}

/**
 * Removes fields the schema does not know (as kube prunes unknown fields) and returns their paths,
 * e.g. `.spec.foo`, for `fieldValidation` Strict (error) and Warn (warning).
 */
export function pruneUnknownFields(schema: JsonSchema, value: Json, path = ''): string[] {
  const unknown: string[] = [];
  walk(schema, value, path, unknown);
  return unknown;
}

function walk(schema: JsonSchema, value: Json, path: string, unknown: string[]): void {
  if (value === null || typeof value !== 'object') return;
  if (schema['x-kubernetes-preserve-unknown-fields'] === true) return;
  if (Array.isArray(value)) {
    const items = schema['items'] as JsonSchema | undefined;
    if (items) value.forEach((v, i) => walk(items, v, `${path}[${i}]`, unknown));
    return;
  }
  if (!isObjectSchema(schema)) return;
  const props = (schema['properties'] ?? {}) as Record<string, JsonSchema>;
  const pattern = schema['patternProperties'] as Record<string, JsonSchema> | undefined;
  const additional = schema['additionalProperties'];
  const obj = value as Record<string, Json>;
  for (const key of Object.keys(obj)) {
    const sub = props[key];
    const childPath = `${path}.${key}`;
    if (sub) {
      walk(sub, obj[key], childPath, unknown);
    } else if (pattern) {
      const first = Object.values(pattern)[0];
      if (first) walk(first, obj[key], childPath, unknown);
    } else if (additional === true) {
      continue;
    } else if (additional && typeof additional === 'object') {
      walk(additional as JsonSchema, obj[key], childPath, unknown);
    } else {
      unknown.push(childPath);
      delete obj[key];
    }
  }
}
