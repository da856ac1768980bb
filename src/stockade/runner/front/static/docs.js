// The API's own OpenAPI document, rendered by the vendored Swagger UI.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({  // eslint-disable-line no-undef
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,  // no third-party validator badge: nothing leaves this runner
  });
});
