/**
 * The `admission.k8s.io/v1` AdmissionReview envelope: readonly wire types, a structural reader
 * that says exactly what is wrong with a malformed review, and the builders of the response.
 * Validators decide; this module only turns their decision into the wire form, so every webhook
 * of the project answers the same way (uid echoed, never a patch).
 */
import { ApiError, type Status } from '../server/errors.ts';

export const ADMISSION_API_VERSION = 'admission.k8s.io/v1';
export const ADMISSION_REVIEW_KIND = 'AdmissionReview';

export interface GroupVersionKind {
  readonly group: string;
  readonly version: string;
  readonly kind: string;
}

export interface GroupVersionResource {
  readonly group: string;
  readonly version: string;
  readonly resource: string;
}

export type AdmissionOperation = 'CREATE' | 'UPDATE' | 'DELETE' | 'CONNECT';
const OPERATIONS: readonly string[] = ['CREATE', 'UPDATE', 'DELETE', 'CONNECT'];

export interface AdmissionUserInfo {
  readonly username?: string;
  readonly uid?: string;
  readonly groups?: readonly string[];
  readonly extra?: Readonly<Record<string, readonly string[]>>;
}

/** `request` of an AdmissionReview v1, as far as webhooks of this project read it. */
export interface AdmissionRequest {
  readonly uid: string;
  readonly kind: GroupVersionKind;
  readonly resource: GroupVersionResource;
  readonly subResource?: string;
  readonly requestKind?: GroupVersionKind;
  readonly requestResource?: GroupVersionResource;
  readonly requestSubResource?: string;
  readonly name?: string;
  readonly namespace?: string;
  readonly operation: AdmissionOperation;
  readonly userInfo?: AdmissionUserInfo;
  /** The new object (CREATE, UPDATE); null for DELETE. */
  readonly object?: unknown;
  /** The existing object (UPDATE, DELETE); null for CREATE. */
  readonly oldObject?: unknown;
  readonly dryRun?: boolean;
  readonly options?: unknown;
}

export interface AdmissionReviewRequest {
  readonly apiVersion: typeof ADMISSION_API_VERSION;
  readonly kind: typeof ADMISSION_REVIEW_KIND;
  readonly request: AdmissionRequest;
}

/** `response.status` of a refusal: a `metav1.Status` whose message kube-apiserver shows the user. */
export interface AdmissionStatus {
  readonly status: 'Failure';
  readonly code: number;
  readonly reason: 'Forbidden' | 'InternalError';
  readonly message: string;
}

export interface AdmissionResponse {
  readonly uid: string;
  readonly allowed: boolean;
  readonly status?: AdmissionStatus;
  /** Shown by kubectl as `Warning: ...`; kube-apiserver truncates beyond 256 characters each. */
  readonly warnings?: readonly string[];
  /** Recorded in the audit log under `<webhook name>/<key>`. */
  readonly auditAnnotations?: Readonly<Record<string, string>>;
}

export interface AdmissionReviewResponse {
  readonly apiVersion: typeof ADMISSION_API_VERSION;
  readonly kind: typeof ADMISSION_REVIEW_KIND;
  readonly response: AdmissionResponse;
}

/** What a validator decided, before it is put in the envelope. */
export type AdmissionDecision =
  | { readonly allowed: true; readonly warnings?: readonly string[]; readonly auditAnnotations?: Readonly<Record<string, string>> }
  | {
      readonly allowed: false;
      readonly code: 403 | 500;
      readonly message: string;
      readonly auditAnnotations?: Readonly<Record<string, string>>;
    };

export type ReadAdmissionReview =
  | { readonly ok: true; readonly review: AdmissionReviewRequest }
  /** `uid` when the request got that far, for logs. */
  | { readonly ok: false; readonly message: string; readonly uid?: string };

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const describe = (v: unknown) => (v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v);

function readGroupVersion(v: unknown, field: string, last: 'kind' | 'resource'): string | undefined {
  if (!isObject(v)) return `${field} must be an object with group, version and ${last}, not ${describe(v)}`;
  for (const k of ['group', 'version', last]) {
    if (typeof v[k] !== 'string') return `${field}.${k} must be a string`;
  }
  if (v[last] === '') return `${field}.${last} must not be empty`;
  return undefined;
}

/**
 * Reads an AdmissionReview v1 request body (already JSON-parsed). Checks the envelope and the
 * fields every webhook relies on; the objects themselves are left to the validator, except that
 * `object` must be an object for CREATE and UPDATE and `oldObject` for UPDATE and DELETE
 * (kube-apiserver always sends them; their absence means the body is not what it claims).
 */
export function readAdmissionReview(body: unknown): ReadAdmissionReview {
  const fail = (message: string, uid?: string): ReadAdmissionReview => ({ ok: false, message, ...(uid !== undefined ? { uid } : {}) });
  if (!isObject(body)) return fail(`the body must be a JSON object (an AdmissionReview), not ${describe(body)}`);
  if (body['apiVersion'] !== ADMISSION_API_VERSION) {
    return fail(`apiVersion must be ${ADMISSION_API_VERSION}, not ${JSON.stringify(body['apiVersion'] ?? null)} (admissionReviewVersions: [v1])`);
  }
  if (body['kind'] !== ADMISSION_REVIEW_KIND) return fail(`kind must be ${ADMISSION_REVIEW_KIND}, not ${JSON.stringify(body['kind'] ?? null)}`);
  const request = body['request'];
  if (!isObject(request)) return fail(`request must be an object, not ${describe(request)}`);
  const uid = request['uid'];
  if (typeof uid !== 'string' || uid === '') return fail('request.uid must be a non-empty string');
  const problem =
    readGroupVersion(request['kind'], 'request.kind', 'kind') ?? readGroupVersion(request['resource'], 'request.resource', 'resource');
  if (problem) return fail(problem, uid);
  const operation = request['operation'];
  if (typeof operation !== 'string' || !OPERATIONS.includes(operation)) {
    return fail(`request.operation must be one of ${OPERATIONS.join(', ')}, not ${JSON.stringify(operation ?? null)}`, uid);
  }
  if ((operation === 'CREATE' || operation === 'UPDATE') && !isObject(request['object'])) {
    return fail(`request.object must be an object for ${operation}, not ${describe(request['object'])}`, uid);
  }
  if ((operation === 'UPDATE' || operation === 'DELETE') && !isObject(request['oldObject'])) {
    return fail(`request.oldObject must be an object for ${operation}, not ${describe(request['oldObject'])}`, uid);
  }
  for (const k of ['subResource', 'name', 'namespace'] as const) {
    if (request[k] !== undefined && typeof request[k] !== 'string') return fail(`request.${k} must be a string`, uid);
  }
  return { ok: true, review: body as unknown as AdmissionReviewRequest };
}

/** The AdmissionReview answering `uid` with `decision`; never a patch. */
export function admissionReviewResponse(uid: string, decision: AdmissionDecision): AdmissionReviewResponse {
  const audit = decision.auditAnnotations ? { auditAnnotations: decision.auditAnnotations } : {};
  const response: AdmissionResponse = decision.allowed
    ? { uid, allowed: true, ...(decision.warnings && decision.warnings.length > 0 ? { warnings: decision.warnings } : {}), ...audit }
    : {
        uid,
        allowed: false,
        status: {
          status: 'Failure',
          code: decision.code,
          reason: decision.code === 403 ? 'Forbidden' : 'InternalError',
          message: decision.message,
        },
        ...audit,
      };
  return { apiVersion: ADMISSION_API_VERSION, kind: ADMISSION_REVIEW_KIND, response };
}

/** The `Status` body of a 400 answer to a malformed AdmissionReview. */
export function badAdmissionReview(message: string): Status {
  return new ApiError('BadRequest', `malformed AdmissionReview: ${message}`).toStatus();
}
