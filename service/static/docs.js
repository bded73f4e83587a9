// /docs: Swagger UI over this server's own /openapi.json. Everything it loads comes from this server; the online
// validator badge (validatorUrl) is off, as it would send the document elsewhere.
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null,
});
