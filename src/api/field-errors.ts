/**
 * Field errors in the form of k8s.io/apimachinery `field.Error`, so that a 422 reads exactly as
 * kube-apiserver's: `spec.kernelVersion: Invalid value: "tesdt": must ...`.
 */
import type { StatusCause } from '../server/errors.ts';

export type FieldErrorType =
  | 'FieldValueRequired'
  | 'FieldValueInvalid'
  | 'FieldValueNotSupported'
  | 'FieldValueForbidden'
  | 'FieldValueTooLong'
  | 'FieldValueDuplicate'
  | 'FieldValueTypeInvalid';

export interface FieldError {
  readonly type: FieldErrorType;
  /** Dotted path such as `spec.kernelVersion` or `metadata.labels[app]`. */
  readonly field: string;
  readonly badValue?: unknown;
  readonly detail: string;
}

const TYPE_TEXT: Record<FieldErrorType, string> = {
  FieldValueRequired: 'Required value',
  FieldValueInvalid: 'Invalid value',
  FieldValueNotSupported: 'Unsupported value',
  FieldValueForbidden: 'Forbidden',
  FieldValueTooLong: 'Too long',
  FieldValueDuplicate: 'Duplicate value',
  FieldValueTypeInvalid: 'Invalid value',
};

/** Values are shown as kube shows them: strings quoted, numbers and booleans bare, objects as JSON. */
function showValue(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (v === null) return 'null';
  const text = JSON.stringify(v);
  return text && text.length > 200 ? `${text.slice(0, 200)}...` : String(text);
}

export function fieldErrorMessage(e: FieldError): string {
  const head = TYPE_TEXT[e.type];
  const withValue =
    e.type === 'FieldValueRequired' || e.type === 'FieldValueForbidden' || e.type === 'FieldValueTooLong' || !('badValue' in e)
      ? head
      : `${head}: ${showValue(e.badValue)}`;
  return e.detail ? `${withValue}: ${e.detail}` : withValue;
}

export function toCause(e: FieldError): StatusCause {
  return { reason: e.type, message: fieldErrorMessage(e), field: e.field };
}

export const fieldError = {
  required: (field: string, detail = ''): FieldError => ({ type: 'FieldValueRequired', field, detail }),
  invalid: (field: string, badValue: unknown, detail: string): FieldError => ({
    type: 'FieldValueInvalid',
    field,
    badValue,
    detail,
  }),
  notSupported: (field: string, badValue: unknown, supported: readonly string[]): FieldError => ({
    type: 'FieldValueNotSupported',
    field,
    badValue,
    detail: `supported values: ${supported.map((s) => JSON.stringify(s)).join(', ')}`,
  }),
  forbidden: (field: string, detail: string): FieldError => ({ type: 'FieldValueForbidden', field, detail }),
  tooLong: (field: string, max: number): FieldError => ({
    type: 'FieldValueTooLong',
    field,
    detail: `must have at most ${max} bytes`,
  }),
  typeInvalid: (field: string, badValue: unknown, detail: string): FieldError => ({
    type: 'FieldValueTypeInvalid',
    field,
    badValue,
    detail,
  }),
} as const;
