// The Settings dialog's form: filled from the settings and read back into new ones.

const $ = (id) => document.getElementById(id);

// models: the names the server serves; current: the one in use.
export function fillSettingsForm(settings, systemPrompt, models, current) {
  $("system-prompt").value = systemPrompt;
  const names = models.length ? models : [current].filter(Boolean);
  $("model").replaceChildren(...names.map((name) => new Option(name, name, false, name === current)));
  $("temperature").value = settings.temperature ?? "";
  $("top-p").value = settings.topP ?? "";
  $("max-tokens").value = settings.maxTokens ?? "";
  $("api-key").value = settings.apiKey;
}

// The settings as the form now has them; a value out of range is clamped, one not a number keeps its
// previous value. An empty temperature or top p leaves the model's recommended value (the server's
// default), an empty max tokens no limit. The form is novalidate: the inputs' step and range only
// guide their arrows, so a value between steps (temperature 0.33) is taken as typed.
export function readSettingsForm(settings) {
  return {
    ...settings,
    model: $("model").value || settings.model,
    temperature: $("temperature").value === "" ? null : numberIn("temperature", 0, 2, settings.temperature),
    topP: $("top-p").value === "" ? null : numberIn("top-p", 0.01, 1, settings.topP),
    maxTokens: $("max-tokens").value === "" ? null : Math.round(numberIn("max-tokens", 1, 1e9, 1)),
    apiKey: $("api-key").value.trim(),
    systemPrompt: $("system-prompt").value,
  };
}

function numberIn(id, low, high, fallback) {
  const value = Number($(id).value);
  return $(id).value !== "" && Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : fallback;
}
